"""Export: a fine-tuned mixed-precision model as integer artifacts that run outside the framework.

- :mod:`~framework.export.graph`: the model traced into integer layers (codes, per-channel scales,
  batch norm folded) and plain ops, the one description both artifacts are written from;
- :mod:`~framework.export.packing`: weight codes bit-packed at their own width;
- :mod:`~framework.export.packed_file`: `model.safetensors` and :func:`load_packed`;
- :mod:`~framework.export.runtime`: the torch model that computes on the codes;
- :mod:`~framework.export.onnx_model`: `model.onnx` (QDQ / QCDQ);
- :mod:`~framework.export.parity`: the framework, the packed model and onnxruntime compared.
"""

from framework.export.graph import ExportGraph, IntegerLayer, export_graph
from framework.export.packed_file import load_packed, read_packed, save_packed

__all__ = ["ExportGraph", "IntegerLayer", "export_graph", "load_packed", "read_packed", "save_packed"]
