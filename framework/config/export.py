"""`export`: what `mpq export` writes and how hard its parity check is."""

from framework.config.types import Schema, between, number, one_of, whole


def _opsets() -> tuple[int, ...]:
    from framework.export.onnx_model import OPSETS

    return OPSETS


class ExportConfig(Schema):
    """`opset` of model.onnx; `batches` x `batch_size` test images for the parity check (`batches`
    null: the whole test split); the export fails when any runtime's identical predictions fall under
    `min_agreement`, or when a layer fed the framework's own input (`layer_images` images) differs
    from the framework's output by more than `layer_base_steps` output steps plus float32's rounding
    bound of its sums."""

    opset: one_of(_opsets)
    batches: whole(1) | None
    batch_size: whole(1)
    min_agreement: between(0, 1)
    layer_base_steps: number(0, strict=True)
    layer_images: whole(1)
    threads: whole(1) | None
