"""`sensitivity`: what `policy=hawq` and `policy=sensitivity` measure the full-precision model on
(`batches` training batches of `batch_size` images) and HAWQ's Hutchinson estimator (`probes`,
`hold_graphs`)."""

from framework.config.types import Flag, Schema, whole


class SensitivityConfig(Schema):
    """`batches` x `batch_size` training samples; `probes` Rademacher probes per trace (at least 2, so
    the estimate has a standard error); `hold_graphs`: hold every batch's gradient graph across them."""

    batches: whole(1)
    batch_size: whole(1)
    probes: whole(2)
    hold_graphs: Flag
