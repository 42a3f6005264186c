"""Parity: do the exported artifacts compute what the framework computed?

Two checks, on images of the target's test split:

1. **End to end.** Logits of the framework's quantized model (float32 fake quantization, as
   `mpq evaluate` scores it), of the same model computed in float64 (`exact`: the same modules and
   code with float64's roundings only, i.e. the integer arithmetic the fake quantization stands for),
   of the packed model rebuilt from `model.safetensors` (exact integer sums, float64 in between) and of
   onnxruntime on `model.onnx` (float32; graph optimisations off, and at onnxruntime's default level).
   For every runtime `r`, against the framework and (suffix `_exact`) against the exact reference:

   - `top1`: its accuracy on the labels;
   - `agreement`: the fraction of images whose predicted class is the same;
   - `max_abs_diff`: max |logit_r - logit_reference| over images and classes;
   - `max_diff_steps`: the same in units of the last layer's output step `s_x * |s_w[o]|`, the value
     of one unit of its integer accumulator (null when that layer is not quantized);
   - `within_half_step`: the fraction of images whose logits all differ by less than half a step,
     i.e. whose final integer accumulators are the same.

   A float32 sum in another order lands a value a few ulps away, and where that value sits within
   those ulps of a rounding boundary of the next quantizer its code moves by one; the change travels
   through the later layers. So two float32 computations of one quantized network differ on some
   images, and how many grows with the number of activations and shrinks with the margins of the
   predictions: the framework's own float32 evaluation departs from the exact one on
   `1 - framework.agreement_exact` of the images, the noise floor of any float32 runtime. The packed
   model must match the exact reference (`export.min_agreement`); onnxruntime must match the framework
   as well, or else stay within twice that floor of the exact reference, plus three images, or else
   flip no prediction that float32 rounding cannot explain: `flips_beyond_noise` counts the images
   where the runtime's class differs from the exact one although the exact logits of the two classes
   lie further apart than twice the largest logit change float32 rounding made in the framework's own
   evaluation (`framework.max_abs_diff_exact`). A network trained for seconds can be chaotic (one
   early code flip moves its logits by thousands of steps) and meet only this last test; a
   well-trained one meets the first (the default pipeline's model: 100 % agreement).

2. **Layer by layer.** Every layer is fed the framework's own input of that layer, and the packed
   layer and the layer alone in onnxruntime are compared with the framework's output (after its
   batch norm): the same integer arithmetic differs by float rounding only, under half an output
   step plus float32's own rounding bound of the sums (:func:`compare_layers`). A wrong code,
   scale, fold or bias shows up here as whole steps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from framework.export.graph import ExportGraph, IntegerLayer

ONNX_LEVELS = {"onnx_off": "ORT_DISABLE_ALL", "onnx_default": "ORT_ENABLE_ALL"}


def onnx_sessions(model_bytes: bytes, threads: int | None = None) -> dict[str, Any]:
    """onnxruntime CPU sessions of one model: optimisations off, and at the default level (all)."""
    import onnxruntime as ort

    sessions = {}
    for key, level in ONNX_LEVELS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        sessions[key] = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return sessions


class _Tally:
    """Running sums of one set of logits compared with a reference's."""

    def __init__(self):
        self.agree = self.half = self.count = 0
        self.max_abs = 0.0
        self.max_steps = 0.0

    def add(self, logits: np.ndarray, reference: np.ndarray, step: np.ndarray | None) -> None:
        diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
        self.agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        self.count += len(logits)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        if step is not None:
            in_steps = diff / step
            self.max_steps = max(self.max_steps, float(in_steps.max(initial=0.0)))
            self.half += int((in_steps.max(axis=1) < 0.5).sum())

    def report(self, has_step: bool, suffix: str = "") -> dict[str, Any]:
        n = max(self.count, 1)
        return {f"agreement{suffix}": self.agree / n, f"max_abs_diff{suffix}": self.max_abs,
                f"max_diff_steps{suffix}": self.max_steps if has_step else None,
                f"within_half_step{suffix}": self.half / n if has_step else None}


def exact_reference(framework: nn.Module) -> nn.Module:
    """The framework's quantized model computed in float64 (a copy; float64 tensors take the reference
    quantizer ops in the native backend, framework.quant.kernels): the same
    modules and code with float64's roundings only, the integer arithmetic the fake quantization
    stands for, to about 1e-16.

    Its integer grids are the float32 model's: each quantized weight is replaced by its float32
    fake-quantized value `c * s` (re-quantized in float64 it gives the same codes `c`; rounding
    `w / s` in float64 instead of float32 would move a weight lying within an ulp of a half step),
    and a learned-range (PACT) input's range is set so that its float64 step is the float32 step."""
    from framework.quant.layers import QConv2d, QLinear
    from framework.quant.quantizers import FULL_PRECISION, LearnedRangeActQuantizer

    reference = copy.deepcopy(framework).eval()
    steps = {}
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, (QConv2d, QLinear)) and module.w_bits < FULL_PRECISION:
                module.weight.copy_(module.weight_quant(module.weight))
            if isinstance(module, LearnedRangeActQuantizer) and module.bits < FULL_PRECISION and module._signed >= 0:
                levels = 2 ** (module.bits - 1) - 1 if module._signed else 2**module.bits - 1
                steps[module] = ((module.range.abs() + 1e-8) / levels, levels)
        reference.double()
        for module, (step, levels) in steps.items():
            module.range.copy_(step.double() * levels - 1e-8)
    return reference


def compare(framework: nn.Module, packed: nn.Module, sessions: dict[str, Any], batches: Iterable,
            output_step: np.ndarray | None, device: torch.device | str = "cpu", progress=None) -> dict[str, Any]:
    """Run every batch `(images, labels)` through the framework (float32, and in float64: `exact`), the
    packed model and each onnxruntime session, and compare each with the framework and with the exact
    reference (see the module docstring). `output_step` is the last layer's step per class (or None)."""
    framework.eval()
    packed.eval()
    exact = exact_reference(framework)
    runtimes = ("packed", *sessions)
    against_framework = {key: _Tally() for key in runtimes}
    against_exact = {key: _Tally() for key in ("framework", *runtimes)}
    correct = {key: 0 for key in ("framework", "exact", *runtimes)}
    flip_margins: dict[str, list[float]] = {key: [] for key in runtimes}  # exact logit gaps of flipped images
    count = 0
    step = None if output_step is None else np.abs(np.asarray(output_step, dtype=np.float64))
    with torch.no_grad():
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels_np = labels.cpu().numpy()
            logits = {"framework": framework(images).float().cpu().numpy(),
                      "exact": exact(images.double()).cpu().numpy(),
                      "packed": packed(images).cpu().numpy()}
            feed = images.float().cpu().numpy()
            for key, session in sessions.items():
                logits[key] = session.run(None, {session.get_inputs()[0].name: feed})[0]
            for key, values in logits.items():
                correct[key] += int((values.argmax(1) == labels_np).sum())
            for key in runtimes:
                against_framework[key].add(logits[key], logits["framework"], step)
            for key in against_exact:
                against_exact[key].add(logits[key], logits["exact"], step)
            exact_top = logits["exact"].argmax(1)
            rows = np.arange(len(exact_top))
            for key in runtimes:
                flipped = np.flatnonzero(logits[key].argmax(1) != exact_top)
                gaps = logits["exact"][rows[flipped], exact_top[flipped]] - logits["exact"][flipped, logits[key].argmax(1)[flipped]]
                flip_margins[key].extend(float(g) for g in gaps)
            count += len(labels_np)
            if progress is not None:
                progress(len(labels_np))
    n, has_step = max(count, 1), step is not None
    report: dict[str, Any] = {"images": count, "exact": {"top1": correct["exact"] / n},
                              "framework": {"top1": correct["framework"] / n,
                                            **against_exact["framework"].report(has_step, "_exact")}}
    noise = 2 * against_exact["framework"].max_abs
    for key in runtimes:
        report[key] = {"top1": correct[key] / n, **against_framework[key].report(has_step),
                       **against_exact[key].report(has_step, "_exact"),
                       "flips_beyond_noise": sum(gap > noise for gap in flip_margins[key])}
    return report


def capture_layers(framework: nn.Module, graph: ExportGraph, images: torch.Tensor):
    """The framework's input and output of every exported layer on `images`: the output after the
    batch norm folded into it, where there is one (copies: later in-place ops would change them)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(store: dict, name: str, take_input: bool):
        def hook(module, args, out):
            store[name] = (args[0] if take_input else out).detach().clone()

        return hook

    for name, layer in graph.layers.items():
        module = framework.get_submodule(name)
        hooks.append(module.register_forward_hook(keep(inputs, name, True)))
        last = framework.get_submodule(layer.folded_bn) if layer.folded_bn else module
        hooks.append(last.register_forward_hook(keep(outputs, name, False)))
    try:
        with torch.no_grad():
            framework(images)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def layer_step(layer: IntegerLayer) -> np.ndarray | None:
    """One unit of the layer's integer accumulator per output channel, `s_x * |s_w[o]|` (None when
    its weight or input is float)."""
    if layer.input is None or not layer.quantized_weight:
        return None
    return float(layer.input.scale) * np.abs(np.asarray(layer.weight_scale, dtype=np.float64))


#: float32's unit roundoff
UNIT_ROUNDOFF = 2.0**-24


def _in_steps(out: np.ndarray, reference: np.ndarray, step: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (out.ndim - 2)
    return np.abs(out.astype(np.float64) - reference.astype(np.float64)) / step.reshape(shape)


def _relative(out: np.ndarray, reference: np.ndarray) -> float:
    diff = np.abs(out.astype(np.float64) - reference.astype(np.float64))
    return float(diff.max(initial=0.0) / max(float(np.abs(reference).max(initial=0.0)), 1e-12))


def compare_layers(framework: nn.Module, graph: ExportGraph, packed: nn.Module, images: torch.Tensor, opset: int,
                   threads: int | None = None, base_steps: float = 0.5) -> dict[str, Any]:
    """Every layer fed the framework's own input of that layer: the packed layer and the layer alone in
    onnxruntime (optimisations off and default) against the framework's output.

    For a quantized layer the difference is counted in output steps `s_x * |s_w[o]|`, and held against
    a tolerance per output: `base_steps`, plus the float32 rounding that the framework's sum and the
    runtime's may each carry, `gamma_(K+3) * sum|c_x c_w|` with `gamma_n = n u / (1 - n u)`: a K-term
    dot product of float32 operands that are themselves rounded products `c * s` (Higham, "Accuracy
    and Stability of Numerical Algorithms", 2002, sec. 3.1; u = 2^-24), plus a few roundings of the
    output itself (scale, bias, batch norm): `8 u |y| / step`. The sums of a 2-4-bit layer are small
    and the tolerance is about `base_steps`; an 8-bit layer with a wide fan-in sums millions of steps,
    where float32 cannot resolve one step. `<runtime>_tolerance_used` is the largest ratio of
    difference to tolerance: above 1, the layer computes something else. A float layer reports its
    largest difference relative to its output's largest value."""
    from framework.export.onnx_model import layer_onnx

    inputs, outputs = capture_layers(framework, graph, images)
    producers = {node["name"]: node["op"] for node in graph.nodes}
    after_clip = {node["layer"]: producers.get(node["inputs"][0]) == "clip"
                  for node in graph.nodes if node["op"] in ("conv", "linear")}
    rows: dict[str, Any] = {}
    for name, layer in graph.layers.items():
        x, reference = inputs[name], outputs[name].float().cpu().numpy()
        module = packed.integer_layers[packed.index[name]]
        with torch.no_grad():
            results = {"packed": module(x).float().cpu().numpy()}
        session_model = layer_onnx(layer, tuple(x.shape), opset, after_clip[name])
        feed = x.float().cpu().numpy()
        for key, session in onnx_sessions(session_model.SerializeToString(), threads).items():
            results[key] = session.run(None, {session.get_inputs()[0].name: feed})[0]
        step = layer_step(layer)
        if step is None:
            rows[name] = {"unit": "relative", **{key: _relative(out, reference) for key, out in results.items()}}
            continue
        with torch.no_grad():
            magnitude = module.accumulate(x, magnitude=True)[0].cpu().numpy()
        terms = int(np.prod(layer.shape[1:])) + 3
        gamma = terms * UNIT_ROUNDOFF / (1 - terms * UNIT_ROUNDOFF)
        shape = (1, -1) + (1,) * (reference.ndim - 2)
        tolerance = base_steps + 2 * gamma * magnitude + 8 * UNIT_ROUNDOFF * np.abs(reference) / step.reshape(shape)
        row: dict[str, Any] = {"unit": "steps", "largest_sum_steps": float(magnitude.max(initial=0.0))}
        for key, out in results.items():
            diff = _in_steps(out, reference, step)
            row[key] = float(diff.max(initial=0.0))
            row[f"{key}_tolerance_used"] = float((diff / tolerance).max(initial=0.0))
        rows[name] = row
    quantized = [row for row in rows.values() if row["unit"] == "steps"]
    runtimes = ("packed", *ONNX_LEVELS)
    return {"images": int(images.shape[0]), "layers": rows,
            "max_steps": {key: max((row[key] for row in quantized), default=None) for key in runtimes},
            "max_tolerance_used": {key: max((row[f"{key}_tolerance_used"] for row in quantized), default=None)
                                   for key in runtimes}}


def failures(report: dict[str, Any], layers: dict[str, Any], min_agreement: float) -> list[str]:
    """What breaks parity (see the module docstring):

    - the packed model (the exact integer arithmetic) agreeing with the exact reference on fewer than
      `min_agreement` of the images;
    - a float32 runtime (onnxruntime) agreeing with the framework on fewer than `min_agreement`, unless
      float32 rounding alone already moves that many: it departs from the exact reference on no more
      than twice as many images as the framework's own float32 evaluation does, plus three, or only
      on images whose exact logits are within float32's noise (`flips_beyond_noise` is 0);
    - a layer that, fed the framework's own input, differs from the framework's output by more than
      its tolerance (:func:`compare_layers`) in some runtime.
    """
    problems = []
    images = max(int(report.get("images", 0)), 1)
    floor = 1 - report["framework"]["agreement_exact"] if "framework" in report else 0.0
    for key, row in report.items():
        if not isinstance(row, dict) or "agreement" not in row:
            continue
        if key == "packed":
            if row["agreement_exact"] < min_agreement:
                problems.append(f"the packed model agrees with the framework computed exactly (float64) on "
                                f"{100 * row['agreement_exact']:.2f}% of predictions (export.min_agreement={min_agreement})")
            continue
        flips, floor_flips = round((1 - row["agreement_exact"]) * images), round(floor * images)  # whole images
        within_noise = flips <= 2 * floor_flips + 3 or row.get("flips_beyond_noise") == 0
        if row["agreement"] < min_agreement and not within_noise:
            problems.append(f"{key} agrees with the framework on {100 * row['agreement']:.2f}% of predictions "
                            f"(export.min_agreement={min_agreement}) and with the exact computation on "
                            f"{100 * row['agreement_exact']:.2f}%, where the framework's own float32 evaluation "
                            f"agrees on {100 * (1 - floor):.2f}%, and {row.get('flips_beyond_noise')} of its flips are "
                            f"beyond float32's noise")
    for name, row in layers["layers"].items():
        if row["unit"] != "steps":
            continue
        for key in ("packed", *ONNX_LEVELS):
            if row[f"{key}_tolerance_used"] > 1:
                problems.append(f"layer '{name}' in {key} differs from the framework by {row[key]:.3g} output steps "
                                f"on the framework's own input ({row[f'{key}_tolerance_used']:.3g} times its tolerance)")
    return problems
