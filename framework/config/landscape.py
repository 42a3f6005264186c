"""`landscape`: what `mpq landscape` measures on a checkpoint: the fixed batches of the loss, the
power iteration's budget, the surrogate gap's radius and the 1-D curve's points and span."""

from framework.config.types import Flag, Schema, number, whole


class LandscapeConfig(Schema):
    """`batches` x `batch_size` training samples; `max_iters`, `tol`, `hold_graphs`: the power iteration; `rho`: the
    gap's radius; `points` values of `t` on [-`span`, `span`]: the curve."""

    batches: whole(1)
    batch_size: whole(1)
    max_iters: whole(1)
    tol: number(0, strict=True)
    hold_graphs: Flag
    rho: number(0)
    points: whole(2)
    span: number(0, strict=True)
