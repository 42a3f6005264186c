"""`mpq evaluate`: top-1 of a checkpoint on the target's test split, with its cost."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from framework.data import build_dataset, build_loader
from framework.errors import MPQError
from framework.policy import write_policy
from framework.quant.cost import float_parameter_count, policy_cost, trace_layers
from framework.results import Result
from framework.stage import (
    Geometry,
    check_classes,
    checkpoint_geometry,
    checkpoint_model,
    data_config_at,
    finish_stage,
    start_stage,
)
from framework.track import open_tracker
from framework.train.checkpoint import load_checkpoint
from framework.train.loop import evaluate


def run_evaluate(cfg: DictConfig) -> Result:
    """Top-1 of the checkpoint at `cfg.checkpoint` on the test split of `cfg.data`, with its cost.

    The model and the input geometry (size, channels) come from the checkpoint, the dataset from
    `cfg.data`. A quantized checkpoint is evaluated under its own policy; `policy=uniform:W/A` (or
    `random:<seed>`, `uniform-budget`, `<policy.json>`) quantizes a full-precision checkpoint after
    training (LSQ steps initialised on one training batch). BitOps and size are at the checkpoint's
    input size. `checkpoint=<export run>/model.safetensors` scores a model `mpq export` wrote
    (:func:`run_evaluate_packed`).
    """
    if not cfg.checkpoint:
        raise MPQError("evaluate needs checkpoint=<checkpoint directory>, e.g. checkpoint=outputs/pretrain/<run>/checkpoints/last")
    if str(cfg.checkpoint).endswith(".safetensors"):
        return run_evaluate_packed(cfg)
    run_dir, device = start_stage(cfg, "evaluate")
    ckpt = load_checkpoint(cfg.checkpoint)
    meta = ckpt.meta["model"]
    geometry = checkpoint_geometry(ckpt, cfg)
    data_cfg = data_config_at(cfg.data, geometry)
    test_set = build_dataset(data_cfg, "test")
    check_classes(ckpt, test_set.mpq_info, str(cfg.data.name), "pick the data=<name> it was trained on")
    model, policy, layers = checkpoint_model(ckpt, cfg, data_cfg, device)
    tracker = open_tracker(cfg, "evaluate")
    started = time.time()
    try:
        val = evaluate(model, build_loader(test_set, cfg.train.eval_batch_size, False, data_cfg), device)
        tracker.track("top1", val["top1"], step=0, subset="val")
        tracker.track("loss", val["loss"], step=0, subset="val")
    finally:
        tracker.close()
    metrics = {"top1": val["top1"], "loss": val["loss"], "samples": val["samples"], "seconds": round(time.time() - started, 2)}
    total_params = float_parameter_count(model)  # quantizer steps and ranges are not counted
    if policy is None:  # a float model: trace it as it is
        traced = trace_layers(model, geometry.input_size, geometry.in_channels)
        cost = policy_cost(traced, {layer.name: (32, 32) for layer in traced}, total_params)
    else:
        cost = policy_cost(layers, policy.bits(), total_params)
        metrics.update({f"avg_{k}": v for k, v in policy.average_bits().items()})
    metrics.update(bitops=cost["bitops"], gbitops=cost["gbitops"], size_mb=cost["size_mb"], macs=cost["macs"],
                   input_size=geometry.input_size)
    artifacts = {"checkpoint": str(ckpt.path)}
    if policy is not None:
        artifacts.update(write_policy(policy, run_dir / "policy.json"))
    result = Result("evaluate", metrics=metrics, artifacts=artifacts,
                    extra={"data": test_set.mpq_info, "model": meta, "tracking": tracker.info(),
                           "quantized": policy is not None})
    return finish_stage(run_dir, result, cfg)


def run_evaluate_packed(cfg: DictConfig) -> Result:
    """Top-1 of an exported `model.safetensors` (`mpq export`) on the test split of `cfg.data`: the
    packed model rebuilt from the file alone (framework.export.load_packed), at the input size and
    channels the file records."""
    from framework.export import read_packed

    run_dir, device = start_stage(cfg, "evaluate")
    packed = read_packed(cfg.checkpoint)
    info = packed.input
    data_cfg = data_config_at(cfg.data, Geometry(int(info["size"]), int(info["channels"])))
    test_set = build_dataset(data_cfg, "test")
    classes = int(packed.model["num_classes"])
    if classes != test_set.mpq_info["num_classes"]:
        raise MPQError(f"{cfg.checkpoint} predicts {classes} classes but dataset '{cfg.data.name}' has "
                       f"{test_set.mpq_info['num_classes']}; pick the data=<name> it was trained on")
    model = packed.runnable().to(device)
    started = time.time()
    val = evaluate(model, build_loader(test_set, cfg.train.eval_batch_size, False, data_cfg), device)
    metrics = {"top1": val["top1"], "loss": val["loss"], "samples": val["samples"],
               "seconds": round(time.time() - started, 2), "input_size": int(info["size"])}
    result = Result("evaluate", metrics=metrics, artifacts={"packed_model": str(cfg.checkpoint)},
                    extra={"data": test_set.mpq_info, "model": packed.model, "quantized": True, "packed": True})
    return finish_stage(run_dir, result, cfg)
