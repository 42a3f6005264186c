"""`model.safetensors`: the exported network with its weights bit-packed at each layer's own width.

Tensors, per integer layer `L` (nothing pickled; safetensors has no sub-byte dtypes):

    L.weight.packed   U8   the weight codes, `w_bits` bits each, two's complement, LSB-first
                           (framework.export.packing), C order of the weight's shape
    L.weight.scale    F64  one scale per output channel (batch norm folded in without rounding)
    L.weight          F32  the float weight instead, for a layer at 32 bits (F64 with batch norm folded)
    L.bias            F64  the folded bias
    L.input.scale     F32  the input activation's step (absent for a float input)

and the string-to-string metadata: `format` (`mpq-packed/1`), `model` (name, classes, input
channels, options), `input` (size, channels, normalisation), `policy` (the policy file's JSON),
`layers` (one JSON table: kind, bits, shape, convolution attributes, weight and input grids),
`graph` (the nodes in execution order and the output) and `sha256` (of the tensors, checked on
reading). :func:`load_packed` rebuilds a runnable
:class:`~framework.export.runtime.IntegerModel` from the file alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framework.errors import MPQError
from framework.export.graph import ActivationGrid, ExportGraph, IntegerLayer
from framework.export.packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "mpq-packed/1"


@dataclass
class PackedFile:
    """What `model.safetensors` holds: the graph and the metadata (model, input, policy)."""

    graph: ExportGraph
    model: dict[str, Any]
    input: dict[str, Any]
    policy: dict[str, Any] | None

    def runnable(self):
        """The :class:`IntegerModel` of the file, in evaluation mode."""
        from framework.export.runtime import IntegerModel

        return IntegerModel(self.graph).eval()


def layer_tensors(layer: IntegerLayer) -> dict[str, np.ndarray]:
    """The tensors of one layer, weights packed."""
    out: dict[str, np.ndarray] = {}
    if layer.quantized_weight:
        out[f"{layer.name}.weight.packed"] = pack_codes(layer.codes, layer.w_bits, signed=True)
        out[f"{layer.name}.weight.scale"] = np.ascontiguousarray(layer.weight_scale, dtype=np.float64)
    else:
        dtype = np.float64 if layer.folded_bn else np.float32
        out[f"{layer.name}.weight"] = np.ascontiguousarray(layer.weight, dtype=dtype)
    if layer.bias is not None:
        out[f"{layer.name}.bias"] = np.ascontiguousarray(layer.bias, dtype=np.float64)
    if layer.input is not None:
        out[f"{layer.name}.input.scale"] = np.array([layer.input.scale], dtype=np.float32)
    return out


def save_packed(path: str | Path, graph: ExportGraph, model: dict[str, Any], input_spec: dict[str, Any],
                policy: dict[str, Any] | None) -> Path:
    """Write `model.safetensors` at `path` atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for layer in graph.layers.values():
        tensors.update(layer_tensors(layer))
    metadata = {
        "format": FORMAT,
        "model": json.dumps(model),
        "input": json.dumps(input_spec),
        "policy": json.dumps(policy),
        "layers": json.dumps({name: layer.to_json() for name, layer in graph.layers.items()}),
        "graph": json.dumps({"nodes": graph.nodes, "output": graph.output}),
        "packing": "weight codes: w_bits bits each, two's complement, LSB-first, C order",
        "sha256": tensors_digest(tensors),
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an artifact to hand on: readable like any written file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes in name order: `read_packed` checks it,
    so a flipped bit in the weights is an error rather than a silently different model."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _corrupt(path: Path, what: str) -> MPQError:
    return MPQError(f"{path} is corrupt or truncated ({what}); re-run `mpq export` on the checkpoint to rewrite it")


def _layer_from_file(name: str, row: dict[str, Any], tensors: dict[str, np.ndarray], path: Path) -> IntegerLayer:
    def tensor(key: str) -> np.ndarray:
        if key not in tensors:
            raise _corrupt(path, f"tensor '{key}' is missing")
        return tensors[key]

    shape = tuple(int(s) for s in row["shape"])
    layer = IntegerLayer(name, row["kind"], int(row["w_bits"]), int(row["a_bits"]), shape, dict(row["attrs"]),
                         w_signed=bool(row["w_signed"]), w_qmin=int(row["w_qmin"]), w_qmax=int(row["w_qmax"]),
                         folded_bn=row.get("folded_bn"))
    if layer.w_bits < 32:
        blob = tensor(f"{name}.weight.packed")
        expected = packed_nbytes(int(np.prod(shape)), layer.w_bits)
        if blob.dtype != np.uint8 or blob.size != expected:
            raise _corrupt(path, f"'{name}.weight.packed' holds {blob.size} bytes, {expected} expected")
        layer.codes = unpack_codes(blob, layer.w_bits, True, shape)
        layer.weight_scale = tensor(f"{name}.weight.scale")
        if layer.weight_scale.shape != (shape[0],):
            raise _corrupt(path, f"'{name}.weight.scale' has shape {layer.weight_scale.shape}")
        low, high = int(layer.codes.min(initial=0)), int(layer.codes.max(initial=0))
        if low < layer.w_qmin or high > layer.w_qmax:
            raise _corrupt(path, f"codes of '{name}' lie in [{low}, {high}], outside [{layer.w_qmin}, {layer.w_qmax}]")
    else:
        layer.weight = tensor(f"{name}.weight")
        if tuple(layer.weight.shape) != shape:
            raise _corrupt(path, f"'{name}.weight' has shape {layer.weight.shape}, {shape} expected")
    if row.get("bias"):
        layer.bias = tensor(f"{name}.bias")
    grid = row.get("input")
    if grid is not None:
        layer.input = ActivationGrid(int(grid["bits"]), bool(grid["signed"]), int(grid["qmin"]), int(grid["qmax"]),
                                     np.float32(tensor(f"{name}.input.scale").reshape(-1)[0]))
    return layer


def read_packed(path: str | Path) -> PackedFile:
    """Read `model.safetensors`; a missing, foreign, corrupt or truncated file is one clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MPQError(f"packed model {path} does not exist; `mpq export checkpoint=...` writes it")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except MPQError:
        raise
    except Exception as err:  # safetensors' header and bounds checks
        raise _corrupt(path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if metadata.get("format") != FORMAT:
        raise MPQError(f"{path} is not an {FORMAT} file (its metadata says format={metadata.get('format')!r})")
    if metadata.get("sha256") != tensors_digest(tensors):
        raise _corrupt(path, "its tensors do not match the SHA-256 recorded at export")
    try:
        layers_json = json.loads(metadata["layers"])
        graph_json = json.loads(metadata["graph"])
        model, input_spec = json.loads(metadata["model"]), json.loads(metadata["input"])
        policy = json.loads(metadata.get("policy") or "null")
    except (KeyError, ValueError) as err:
        raise _corrupt(path, f"metadata: {type(err).__name__} {err}") from None
    layers = {name: _layer_from_file(name, row, tensors, path) for name, row in layers_json.items()}
    graph = ExportGraph(graph_json["nodes"], layers, graph_json["output"])
    return PackedFile(graph, model, input_spec, policy)


def load_packed(path: str | Path):
    """A runnable torch model (:class:`~framework.export.runtime.IntegerModel`) from `model.safetensors`
    alone: `load_packed("model.safetensors")(images) -> logits`."""
    return read_packed(path).runnable()
