"""`mpq export`: a fine-tuned mixed-precision checkpoint as integer artifacts, with a parity proof.

Writes into the run directory:

- `model.safetensors`: weights as integer codes bit-packed at each layer's width, per-channel scales
  and biases with batch norm folded, activation grids, the policy, the model and its input
  (framework.export.packed_file); `framework.export.load_packed` rebuilds a runnable model from it;
- `model.onnx`: the same network as ONNX QDQ/QCDQ at `export.opset` (framework.export.onnx_model);
- `export.json` and `result.json`: the sizes of both files beside the policy's, the layer table and
  the parity report (framework.export.parity).

Everything runs on the CPU (onnxruntime's CPU provider is the reference deployment). The export
fails (status error, exit 2) when a runtime's identical predictions fall under
`export.min_agreement`, or a layer fed the framework's own input differs from the framework's output
by more than `export.layer_base_steps` output steps plus float32's rounding bound of its sums.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from framework.data import build_dataset, build_loader, get_dataset_spec
from framework.data.transforms import normalisation
from framework.errors import MPQError
from framework.export.graph import ExportGraph, export_graph
from framework.export.onnx_model import activation_type, build_onnx, weight_type
from framework.export.packed_file import load_packed, save_packed
from framework.export.packing import packed_nbytes
from framework.export.parity import compare, compare_layers, failures, onnx_sessions
from framework.policy import write_policy
from framework.quant.cost import float_parameter_count, policy_cost
from framework.results import Result, atomic_write_text
from framework.stage import (
    build_model,
    check_classes,
    checkpoint_geometry,
    checkpoint_model,
    data_config_at,
    finish_stage,
    model_from_checkpoint,
    resolve_policy,
    start_stage,
)
from framework.track import open_tracker
from framework.train.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

ONNX_TYPE_NAMES = {2: "uint8", 3: "int8", 21: "uint4", 22: "int4", 25: "uint2", 26: "int2"}


def _model_to_export(ckpt: Checkpoint, cfg: DictConfig, data_cfg: DictConfig):
    """The quantized model: the checkpoint's own policy (`policy=`, if given, must be the same), or a
    full-precision checkpoint quantized after training under `policy=`."""
    meta = ckpt.meta["model"]
    if not ckpt.meta.get("quant"):
        if not cfg.policy:
            raise MPQError(f"checkpoint {ckpt.path} holds no quantization policy (it is full precision); export the "
                           f"checkpoint `mpq finetune` wrote, or pass policy=<policy.json|uniform:W/A> to quantize "
                           f"this one after training")
        return checkpoint_model(ckpt, cfg, data_cfg, torch.device("cpu"))
    model, policy, layers = model_from_checkpoint(ckpt, cfg)
    if cfg.policy:
        given, _ = resolve_policy(str(cfg.policy), meta["name"], lambda: build_model(meta),
                                  checkpoint_geometry(ckpt, cfg), cfg.quant, search_cfg=cfg.search)
        own, theirs = policy.bits(), given.bits()
        differ = [name for name in own if tuple(own[name]) != tuple(theirs.get(name, ()))]
        if differ:
            name = differ[0]
            w, a = own[name]
            other = theirs.get(name)
            other_text = f"W{other[0]}/A{other[1]}" if other else "absent"
            raise MPQError(f"policy {cfg.policy} does not match checkpoint {ckpt.path}: layer '{name}' is W{w}/A{a} in "
                           f"the checkpoint and {other_text} in the policy ({len(differ)} layers differ); drop policy= "
                           f"to export the checkpoint under its own policy")
    return model.cpu(), policy, layers


def _input_spec(cfg: DictConfig, ckpt: Checkpoint, data_cfg: DictConfig) -> dict[str, Any]:
    """What the network expects: image size, channels and the normalisation applied before it."""
    mean, std = normalisation(get_dataset_spec(str(data_cfg.name)), int(data_cfg.channels))
    return {"size": int(data_cfg.input_size), "channels": int(data_cfg.channels), "dataset": str(data_cfg.name),
            "layout": "NCHW float32", "mean": list(mean), "std": list(std),
            "preprocess": "x = (pixels / 255 - mean) / std per channel"}


def layer_table(graph: ExportGraph, opset: int, ops: dict[str, str]) -> list[dict[str, Any]]:
    """One row per exported layer: bits, weights, packed bytes and the ONNX types used."""
    rows = []
    producer = {node["layer"]: ops.get(node["inputs"][0]) for node in graph.nodes if node["op"] in ("conv", "linear")}
    for name, layer in graph.layers.items():
        params = int(np.prod(layer.shape))
        row: dict[str, Any] = {"layer": name, "kind": layer.kind, "w_bits": layer.w_bits, "a_bits": layer.a_bits,
                               "params": params, "folded_bn": layer.folded_bn}
        if layer.quantized_weight:
            code, width = weight_type(layer.w_bits, opset)
            row.update(packed_bytes=packed_nbytes(params, layer.w_bits), onnx_weight=ONNX_TYPE_NAMES[code])
        else:
            row.update(packed_bytes=4 * params, onnx_weight="float32")
        if layer.input is not None:
            code, _, clip = activation_type(layer.input, opset, narrow=producer[name] != "clip")
            row["onnx_input"] = ONNX_TYPE_NAMES[code] + (f" + Clip[{layer.input.qmin}, {layer.input.qmax}]" if clip else "")
        else:
            row["onnx_input"] = "float32"
        rows.append(row)
    return rows


def _write_onnx(path: Path, model) -> bytes:
    data = model.SerializeToString()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def _batches(loader, count: int | None):
    return loader if count is None else itertools.islice(loader, int(count))


def run_export(cfg: DictConfig) -> Result:
    """Export the checkpoint at `cfg.checkpoint` (a run directory or checkpoint directory): see the
    module docstring. The parity check runs `export.batches` batches of `export.batch_size` images
    of the test split of `cfg.data` (the checkpoint's geometry)."""
    if not cfg.checkpoint:
        raise MPQError("export needs checkpoint=<fine-tuned run or checkpoint directory>, "
                       "e.g. checkpoint=outputs/finetune/<run>")
    settings = cfg.export
    run_dir, _ = start_stage(cfg, "export")
    started = time.time()
    ckpt = load_checkpoint(cfg.checkpoint)
    meta = ckpt.meta["model"]
    data_cfg = data_config_at(cfg.data, checkpoint_geometry(ckpt, cfg))
    test_set = build_dataset(data_cfg, "test")
    check_classes(ckpt, test_set.mpq_info, str(cfg.data.name), "pick the data=<name> it was trained on")
    model, policy, layers = _model_to_export(ckpt, cfg, data_cfg)
    model.eval()
    graph = export_graph(model)
    input_spec = _input_spec(cfg, ckpt, data_cfg)
    policy_dict = json.loads(policy.to_json())
    packed_path = save_packed(run_dir / "model.safetensors", graph, meta, input_spec, policy_dict)
    opset = int(settings.opset)
    onnx_model = build_onnx(graph, opset, input_spec, {"model": meta, "input": input_spec, "policy": policy_dict})
    onnx_path = run_dir / "model.onnx"
    onnx_bytes = _write_onnx(onnx_path, onnx_model)
    export_seconds = time.time() - started

    # parity: the packed model is rebuilt from the file alone, onnxruntime reads the written model
    packed = load_packed(packed_path)
    sessions = onnx_sessions(onnx_path.read_bytes(), settings.threads)
    last = graph.last_layer()
    output_step = None
    if last.quantized_weight and last.input is not None:
        output_step = float(last.input.scale) * np.asarray(last.weight_scale, dtype=np.float64)
    loader = build_loader(test_set, int(settings.batch_size), False, data_cfg)
    first_images, _ = next(iter(loader))
    layer_report = compare_layers(model, graph, packed, first_images[: int(settings.layer_images)], opset,
                                  settings.threads, float(settings.layer_base_steps))
    total = len(test_set) if settings.batches is None else min(len(test_set), int(settings.batches) * int(settings.batch_size))
    bar = tqdm(total=total, desc="export parity", unit="img", leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
    try:
        report = compare(model, packed, sessions, _batches(loader, settings.batches), output_step, progress=bar.update)
    finally:
        bar.close()
    parity_seconds = time.time() - started - export_seconds

    total_params = float_parameter_count(model)
    cost = policy_cost(layers, policy.bits(), total_params)
    ops = {node["name"]: node["op"] for node in graph.nodes}
    table = layer_table(graph, opset, ops)
    sizes = {
        "float32_bytes": 4 * total_params,
        "policy_bytes": cost["size_mb"] * 1e6,
        "policy_weight_bits": sum(row["params"] * row["w_bits"] for row in table),
        "packed_weight_bytes": sum(row["packed_bytes"] for row in table),
        "safetensors_bytes": packed_path.stat().st_size,
        "onnx_bytes": len(onnx_bytes),
    }
    report["layer_by_layer"] = layer_report
    problems = failures(report, layer_report, float(settings.min_agreement))
    metrics = {
        "framework_top1": report["framework"]["top1"], "exact_top1": report["exact"]["top1"],
        "packed_top1": report["packed"]["top1"],
        "onnx_top1": report["onnx_off"]["top1"], "onnx_default_top1": report["onnx_default"]["top1"],
        "agreement": min(report[k]["agreement"] for k in ("packed", "onnx_off", "onnx_default")),
        "packed_agreement_exact": report["packed"]["agreement_exact"],
        "onnx_agreement_exact": min(report[k]["agreement_exact"] for k in ("onnx_off", "onnx_default")),
        "framework_agreement_exact": report["framework"]["agreement_exact"],
        "within_half_step": min((report[k]["within_half_step"] for k in ("packed", "onnx_off", "onnx_default")
                                 if report[k]["within_half_step"] is not None), default=None),
        "layer_max_steps": max((v for v in layer_report["max_steps"].values() if v is not None), default=None),
        "layer_max_tolerance_used": max((v for v in layer_report["max_tolerance_used"].values() if v is not None),
                                        default=None),
        "images": report["images"], "opset": opset, **sizes,
        "compression_vs_float32": sizes["float32_bytes"] / sizes["safetensors_bytes"],
        "export_seconds": round(export_seconds, 2), "parity_seconds": round(parity_seconds, 2),
    }
    document = {"checkpoint": str(ckpt.path), "model": meta, "input": input_spec, "opset": opset, "sizes": sizes,
                "layers": table, "parity": report, "parity_passed": not problems, "problems": problems,
                "output_step": None if output_step is None else {"min": float(np.abs(output_step).min()),
                                                                 "max": float(np.abs(output_step).max())}}
    atomic_write_text(run_dir / "export.json", json.dumps(document, indent=2) + "\n")
    artifacts = {"safetensors": str(packed_path), "onnx": str(onnx_path), "export": str(run_dir / "export.json"),
                 "checkpoint": str(ckpt.path)}
    artifacts.update(write_policy(policy, run_dir / "policy.json"))
    tracker = open_tracker(cfg, "export")
    try:
        for key in ("framework_top1", "packed_top1", "onnx_top1", "onnx_default_top1", "agreement"):
            tracker.track(key, metrics[key], step=0, subset="test")
    finally:
        tracker.close()
    print(format_export(metrics, report, run_dir), file=sys.stderr)
    if problems:
        raise MPQError(f"export parity failed: {'; '.join(problems)} (report: {run_dir / 'export.json'})",
                       details={"metrics": metrics, "artifacts": artifacts, "parity": report})
    result = Result("export", metrics=metrics, artifacts=artifacts,
                    extra={"model": meta, "parity": report, "layers": table, "tracking": tracker.info()})
    return finish_stage(run_dir, result, cfg)


def format_export(metrics: dict[str, Any], report: dict[str, Any], run_dir: Path) -> str:
    """The lines `mpq export` prints: sizes, then one row per runtime."""
    kib = 1024

    def steps(value) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [
        f"mpq export: {run_dir}",
        f"  weights packed {metrics['packed_weight_bytes'] / kib:.1f} KiB (policy: {metrics['policy_weight_bits'] / 8 / kib:.1f} "
        f"KiB of weights at their bits), model.safetensors {metrics['safetensors_bytes'] / kib:.1f} KiB, model.onnx "
        f"{metrics['onnx_bytes'] / kib:.1f} KiB, float32 {metrics['float32_bytes'] / kib:.1f} KiB",
        f"  {'':<24}{'':>9}{'vs the framework (float32)':^36}{'vs exact (float64)':^24}",
        f"  {'runtime':<24}{'top-1':>9}{'same pred.':>12}{'max steps':>11}{'< 1/2 step':>13}{'same pred.':>12}"
        f"{'max steps':>12}",
        f"  {'framework (float32)':<24}{100 * report['framework']['top1']:>8.2f}%{'':>36}"
        f"{100 * report['framework']['agreement_exact']:>11.2f}%{steps(report['framework']['max_diff_steps_exact']):>12}",
        f"  {'framework (float64)':<24}{100 * report['exact']['top1']:>8.2f}%",
    ]
    for key, label in (("packed", "packed (safetensors)"), ("onnx_off", "onnxruntime, opt off"),
                       ("onnx_default", "onnxruntime, default")):
        row = report[key]
        half = "-" if row["within_half_step"] is None else f"{100 * row['within_half_step']:.2f}%"
        lines.append(f"  {label:<24}{100 * row['top1']:>8.2f}%{100 * row['agreement']:>11.2f}%{steps(row['max_diff_steps']):>11}"
                     f"{half:>13}{100 * row['agreement_exact']:>11.2f}%{steps(row['max_diff_steps_exact']):>12}")
    lines.append(f"  on {report['images']} test images; max steps: the largest logit difference in output steps of "
                 f"the last layer")
    layer = report["layer_by_layer"]
    worst = ", ".join(f"{key} {value:.3g} ({layer['max_tolerance_used'][key]:.2g} of its tolerance)"
                      for key, value in layer["max_steps"].items() if value is not None)
    lines.append(f"  layer by layer on the framework's own inputs ({layer['images']} images), largest difference "
                 f"in output steps: {worst or 'no quantized layer'}")
    return "\n".join(lines)
