"""The stages as plain functions: `run_<stage>(cfg) -> Result`.

Each stage reads its inputs from paths in the config, writes its artifacts into `cfg.run_dir` and
returns a small :class:`Result`. Stages pass each other files (checkpoints, policies), never live
objects, so any stage can run on another machine or be re-run alone. The `mpq` command and the
launchers only build configs and call these functions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from framework import __version__
from framework.data import build_dataset, build_loader
from framework.errors import MPQError, StageNotAvailable
from framework.models import create_model
from framework.policy import Policy, policy_from_dict, validate_policy, write_policy
from framework.quant.apply import Geometry, quantize_with_policy, resolve_policy
from framework.quant.cost import float_parameter_count, policy_cost, trace_layers
from framework.results import Result, write_result
from framework.track import open_tracker
from framework.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from framework.train.loop import evaluate, resolve_device, seed_everything, train_steps
from framework.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def _run_dir(cfg: DictConfig, stage: str) -> Path:
    run_dir = cfg.get("run_dir")
    if not run_dir:
        run_dir = Path("outputs") / stage / time.strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _set_threads(cfg: DictConfig) -> None:
    import torch

    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def _model_meta(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    node = cfg.model.get("options")
    options = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return {
        "name": str(cfg.model.name),
        "num_classes": int(num_classes),
        "in_channels": int(cfg.data.channels),
        "options": options,
    }


def _build_model(meta: dict[str, Any], weights: str | None = None):
    return create_model(
        meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], weights=weights, **meta["options"]
    )


def run_pretrain(cfg: DictConfig) -> Result:
    """Full-precision training of `cfg.model` on the target data `cfg.data`.

    SGD or AdamW with a cosine schedule, validation on the test split every `train.val_every`
    epochs, `checkpoints/last` after every epoch and `checkpoints/best` at the best validation top-1.
    `metrics.top1` is the top-1 of the final model on the test split.
    """
    stage = "pretrain"
    run_dir = _run_dir(cfg, stage)
    _set_threads(cfg)
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.get("device", "auto"))

    train_set = build_dataset(cfg.data, "train")
    test_set = build_dataset(cfg.data, "test")
    num_classes = train_set.mpq_info["num_classes"]
    train_loader = build_loader(train_set, cfg.train.batch_size, True, cfg.data, seed=int(cfg.seed))
    test_loader = build_loader(test_set, cfg.train.eval_batch_size, False, cfg.data)
    if len(train_loader) == 0:
        raise MPQError(f"the training set has {len(train_set)} samples, fewer than one batch; raise data.fraction")

    model_meta = _model_meta(cfg, num_classes)
    model = _build_model(model_meta, cfg.model.get("weights")).to(device)
    epochs = int(cfg.train.epochs)
    total_steps = epochs * len(train_loader)
    if cfg.train.get("max_steps"):
        total_steps = min(total_steps, int(cfg.train.max_steps))
    epochs = -(-total_steps // len(train_loader))
    optimizer = build_optimizer(model, cfg.train.optim)
    scheduler = build_scheduler(optimizer, total_steps, cfg.train.optim)

    tracker = open_tracker(cfg, stage)
    meta_base = {
        "stage": stage,
        "model": model_meta,
        "data": {"name": str(cfg.data.name), "input_size": cfg.data.input_size, "channels": int(cfg.data.channels)},
        "train_data": train_set.mpq_info,
        "code_version": __version__,
    }
    ckpt_dir = run_dir / "checkpoints"
    val_every = max(1, int(cfg.train.get("val_every", 1)))
    log.info(
        "pretrain %s on %s: %d train / %d test samples, %d steps (%d epochs), device %s",
        model_meta["name"], cfg.data.name, len(train_set), len(test_set), total_steps, epochs, device,
    )
    started = time.time()
    step = 0
    best: dict[str, Any] = {"top1": -1.0}
    val: dict[str, Any] = {}
    history = []
    try:
        for epoch in range(1, epochs + 1):

            def on_step(i: int, loss: float, acc: float, _base=step) -> None:
                if (i + _base) % 10 == 0:
                    tracker.track("loss", loss, step=_base + i, subset="train")
                    tracker.track("top1", acc, step=_base + i, subset="train")
                    tracker.track("lr", optimizer.param_groups[0]["lr"], step=_base + i, subset="train")

            stats = train_steps(
                model, train_loader, optimizer, scheduler, device, total_steps - step, on_step,
                desc=f"epoch {epoch}/{epochs}",
            )
            step += int(stats["steps"])
            last_epoch = epoch == epochs or step >= total_steps
            entry = {"epoch": epoch, "step": step, "train_loss": stats["loss"], "train_top1": stats["top1"]}
            if epoch % val_every == 0 or last_epoch:
                val = evaluate(model, test_loader, device, desc="validate")
                tracker.track("loss", val["loss"], step=step, subset="val")
                tracker.track("top1", val["top1"], step=step, subset="val")
                entry.update(val_loss=val["loss"], val_top1=val["top1"])
                meta = {**meta_base, "epoch": epoch, "step": step, "metrics": {"top1": val["top1"], "loss": val["loss"]}}
                if val["top1"] > best["top1"]:
                    best = {"top1": val["top1"], "epoch": epoch, "step": step}
                    save_checkpoint(ckpt_dir / "best", model, meta)
            else:
                meta = {**meta_base, "epoch": epoch, "step": step, "metrics": {}}
            save_checkpoint(
                ckpt_dir / "last",
                model,
                meta,
                training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            )
            history.append(entry)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})
            if step >= total_steps:
                break
    finally:
        tracker.close()
    elapsed = time.time() - started
    metrics = {
        "top1": val["top1"],
        "loss": val["loss"],
        "best_top1": best["top1"],
        "best_epoch": best.get("epoch"),
        "steps": step,
        "epochs": len(history),
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "seconds": round(elapsed, 2),
    }
    result = Result(
        stage,
        metrics=metrics,
        artifacts={"checkpoint": str(ckpt_dir / "last"), "best_checkpoint": str(ckpt_dir / "best")},
        extra={"history": history, "data": train_set.mpq_info, "tracking": tracker.info(), "world_size": 1},
    )
    write_result(run_dir, result, cfg)
    return result


def _checkpoint_geometry(ckpt, cfg: DictConfig) -> Geometry:
    data = ckpt.meta.get("data", {})
    spec_size = data.get("input_size") or cfg.data.input_size
    return Geometry(int(spec_size or 28), int(data.get("channels") or cfg.data.channels))


def model_from_checkpoint(ckpt, cfg: DictConfig):
    """The model a checkpoint holds, quantized as its `meta.quant` says, with its weights loaded.

    Returns `(model, policy or None, layers or None)`.
    """
    model_meta = ckpt.meta["model"]
    quant = ckpt.meta.get("quant")
    model = _build_model(model_meta)
    policy = layers = None
    if quant:
        policy = policy_from_dict(quant["policy"], f"the policy in checkpoint {ckpt.path}")
        qcfg = OmegaConf.create(quant["config"])
        geometry = _checkpoint_geometry(ckpt, cfg)
        layers = trace_layers(model, geometry.input_size, geometry.in_channels)
        validate_policy(policy, model_meta["name"], layers, f"the policy in checkpoint {ckpt.path}")
        quantize_with_policy(model, policy, qcfg, layers)
    load_model_state(model, ckpt)
    return model, policy, layers


@torch.no_grad()
def calibrate(model, loader, device, batches: int) -> None:
    """Initialise data-dependent quantizers (LSQ activation steps) on a few training batches."""
    model.eval()
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        model(images.to(device))


def run_evaluate(cfg: DictConfig) -> Result:
    """Top-1 of the checkpoint at `cfg.checkpoint` on the test split of `cfg.data`, with its cost.

    The model and the input geometry (size, channels) come from the checkpoint, the dataset from
    `cfg.data`. A quantized checkpoint is evaluated under its own policy; `policy=uniform:W/A` or
    `policy=<policy.json>` quantizes a full-precision checkpoint after training (LSQ steps initialised
    on `quant.calibration_batches` training batches). BitOps and size are at the checkpoint's input size.
    """
    stage = "evaluate"
    if not cfg.get("checkpoint"):
        raise MPQError("evaluate needs checkpoint=<checkpoint directory>, e.g. checkpoint=outputs/pretrain/<run>/checkpoints/last")
    run_dir = _run_dir(cfg, stage)
    _set_threads(cfg)
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = load_checkpoint(cfg.checkpoint)
    model_meta = ckpt.meta["model"]
    geometry = _checkpoint_geometry(ckpt, cfg)
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.input_size = geometry.input_size
        data_cfg.channels = geometry.in_channels
    test_set = build_dataset(data_cfg, "test")
    if test_set.mpq_info["num_classes"] != model_meta["num_classes"]:
        raise MPQError(
            f"checkpoint {ckpt.path} predicts {model_meta['num_classes']} classes but dataset "
            f"'{cfg.data.name}' has {test_set.mpq_info['num_classes']}; pick the data=<name> it was trained on"
        )
    model, policy, layers = model_from_checkpoint(ckpt, cfg)
    if cfg.get("policy"):
        if policy is not None:
            raise MPQError(f"checkpoint {ckpt.path} is already quantized under its own policy; drop policy=")
        policy, layers = resolve_policy(
            str(cfg.policy), model_meta["name"], lambda: _build_model(model_meta), geometry, cfg.quant
        )
        quantize_with_policy(model, policy, cfg.quant, layers)
        model.to(device)
        calib = build_dataset(data_cfg, "train", train_transforms=False)
        calibrate(model, build_loader(calib, cfg.train.batch_size, True, data_cfg, seed=int(cfg.seed)), device,
                  int(cfg.quant.get("calibration_batches", 1)))
    model.to(device)
    tracker = open_tracker(cfg, stage)
    started = time.time()
    try:
        val = evaluate(model, build_loader(test_set, cfg.train.eval_batch_size, False, data_cfg), device)
        tracker.track("top1", val["top1"], step=0, subset="val")
        tracker.track("loss", val["loss"], step=0, subset="val")
    finally:
        tracker.close()
    metrics = {"top1": val["top1"], "loss": val["loss"], "samples": val["samples"], "seconds": round(time.time() - started, 2)}
    if policy is None:
        float_model = _build_model(model_meta)
        traced = trace_layers(float_model, geometry.input_size, geometry.in_channels)
        policy_metrics = policy_cost(traced, {layer.name: (32, 32) for layer in traced}, float_parameter_count(float_model))
    else:
        policy_metrics = policy_cost(layers, policy.bits(), float_parameter_count(_build_model(model_meta)))
        metrics.update({f"avg_{k}": v for k, v in policy.average_bits().items()})
    metrics.update(bitops=policy_metrics["bitops"], gbitops=policy_metrics["gbitops"], size_mb=policy_metrics["size_mb"],
                   macs=policy_metrics["macs"], input_size=geometry.input_size)
    artifacts = {"checkpoint": str(ckpt.path)}
    if policy is not None:
        artifacts.update(write_policy(policy, run_dir / "policy.json"))
    result = Result(
        stage,
        metrics=metrics,
        artifacts=artifacts,
        extra={"data": test_set.mpq_info, "model": model_meta, "tracking": tracker.info(),
               "quantized": policy is not None},
    )
    write_result(run_dir, result, cfg)
    return result


def run_cost(cfg: DictConfig) -> Result:
    """MACs, BitOps and size of `cfg.model` under `cfg.policy` at `input_size` x `in_channels`, no data.

    `policy` is `uniform:W/A` (default 8/8) or a `policy.json`. Prints a per-layer table; writes the
    policy (as applied, with its plot) and `result.json` with `metrics.macs`, `bitops`, `size_mb`.
    """
    stage = "cost"
    run_dir = _run_dir(cfg, stage)
    input_size = int(cfg.get("input_size") or cfg.data.input_size or 224)
    in_channels = int(cfg.get("in_channels") or 3)
    num_classes = int(cfg.get("num_classes") or cfg.model.get("num_classes") or 1000)
    meta = {**_model_meta(cfg, num_classes), "in_channels": in_channels}
    spec = str(cfg.get("policy") or "uniform:8/8")
    policy, layers = resolve_policy(spec, meta["name"], lambda: _build_model(meta), Geometry(input_size, in_channels), cfg.quant)
    total = policy.cost["target"]
    print(format_cost_table(policy, layers, input_size, in_channels))
    artifacts = write_policy(policy, run_dir / "policy.json")
    tracker = open_tracker(cfg, stage)
    try:
        for key in ("gmacs", "gbitops", "size_mb"):
            tracker.track(key, getattr(total, key) if hasattr(total, key) else total.model_extra[key], step=0, subset="val")
        tracker.track_image("policy", artifacts["policy_plot"], step=0, subset="val")
    finally:
        tracker.close()
    metrics = {
        "macs": total.macs, "gmacs": total.macs / 1e9, "bitops": total.bitops, "gbitops": total.gbitops,
        "size_mb": total.size_mb, "layers": len(layers), "input_size": input_size, "in_channels": in_channels,
        **{f"avg_{k}": v for k, v in policy.average_bits().items()},
    }
    result = Result(stage, metrics=metrics, artifacts=artifacts,
                    extra={"model": meta, "policy_spec": spec, "tracking": tracker.info()})
    write_result(run_dir, result, cfg)
    return result


def format_cost_table(policy: Policy, layers: list, input_size: int, in_channels: int) -> str:
    """The per-layer table `mpq cost` prints."""
    head = f"{'layer':<28}{'kind':<7}{'W/A':>7}{'MMACs':>10}{'params':>10}{'MBitOps':>11}"
    lines = [f"{policy.model} at {in_channels}x{input_size}x{input_size}", head, "-" * len(head)]
    for layer in layers:
        entry = policy.layers[layer.name]
        mark = "*" if entry.fixed else ""
        lines.append(
            f"{layer.name:<28.28}{layer.kind:<7}{f'{entry.w_bits}/{entry.a_bits}{mark}':>7}{layer.macs / 1e6:>10.2f}"
            f"{layer.params:>10d}{layer.macs * entry.w_bits * entry.a_bits / 1e6:>11.1f}"
        )
    total = policy.cost["target"]
    lines += [
        "-" * len(head),
        f"total: {total.macs / 1e9:.4f} GMACs, {total.gbitops:.3f} GBitOps, {total.size_mb:.3f} MB"
        + ("   (* fixed layer)" if any(e.fixed for e in policy.layers.values()) else ""),
    ]
    return "\n".join(lines)


def _not_available(stage: str):
    def run(cfg: DictConfig) -> Result:
        raise StageNotAvailable(stage)

    run.__name__ = f"run_{stage}"
    run.__doc__ = f"The `{stage}` stage (not available yet in this version)."
    return run


run_search = _not_available("search")
run_sweep = _not_available("sweep")
run_finetune = _not_available("finetune")
run_export = _not_available("export")


def _sub_config(cfg: DictConfig, run_dir: Path, **updates: Any) -> DictConfig:
    sub = cfg.copy()
    with open_dict(sub):
        sub.run_dir = str(run_dir)
        for key, value in updates.items():
            OmegaConf.update(sub, key, value, force_add=True)
    return sub


#: the stages `pipeline` chains, in order; later stages are added here as they are built
PIPELINE_STAGES = ("pretrain", "evaluate")


def run_pipeline(cfg: DictConfig) -> Result:
    """The stages that exist, in order, each in its own sub-folder; then one summary table.

    pretrain (full precision, target data) -> evaluate (its final checkpoint).
    """
    stage = "pipeline"
    run_dir = _run_dir(cfg, stage)
    rows: list[dict[str, Any]] = []
    artifacts: dict[str, str] = {}

    started = time.time()
    pre = run_pretrain(_sub_config(cfg, run_dir / "pretrain"))
    rows.append({"stage": "pretrain", "top1": pre.metrics["top1"], "seconds": time.time() - started})
    artifacts["checkpoint"] = pre.artifacts["checkpoint"]

    started = time.time()
    ev = run_evaluate(_sub_config(cfg, run_dir / "evaluate", checkpoint=pre.artifacts["checkpoint"]))
    rows.append({"stage": "evaluate", "top1": ev.metrics["top1"], "seconds": time.time() - started})

    total = sum(r["seconds"] for r in rows)
    metrics = {
        "fp_top1": ev.metrics["top1"],
        "seconds": round(total, 2),
        "stage_seconds": {r["stage"]: round(r["seconds"], 2) for r in rows},
    }
    result = Result(stage, metrics=metrics, artifacts=artifacts, extra={"stages": rows, "run_dir": str(run_dir)})
    write_result(run_dir, result, cfg)
    print(format_summary(cfg, rows, run_dir))
    return result


def format_summary(cfg: DictConfig, rows: list[dict[str, Any]], run_dir: Path) -> str:
    """The table `mpq pipeline` prints at the end."""
    lines = [
        "",
        f"mpq pipeline summary  (model {cfg.model.name}, target {cfg.data.name})",
        f"{'stage':<12}{'top-1 (%)':>12}{'time (s)':>12}",
        "-" * 36,
    ]
    for row in rows:
        lines.append(f"{row['stage']:<12}{100 * row['top1']:>12.2f}{row['seconds']:>12.1f}")
    lines.append("-" * 36)
    lines.append(f"{'total':<12}{'':>12}{sum(r['seconds'] for r in rows):>12.1f}")
    lines.append(f"outputs: {run_dir}  (result.json, pretrain/checkpoints/)")
    return "\n".join(lines)
