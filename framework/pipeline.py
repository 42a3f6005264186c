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
from framework.dist.process_group import open_process_group
from framework.errors import MPQError, StageNotAvailable
from framework.models import create_model
from framework.policy import Policy, policy_from_dict, validate_policy, write_policy
from framework.quant.apply import Geometry, quant_meta, quantize_with_policy, resolve_policy
from framework.quant.cost import float_parameter_count, policy_cost, trace_layers
from framework.results import Result, write_result
from framework.track import open_tracker
from framework.train.checkpoint import load_checkpoint, load_model_state
from framework.train.data_parallel import train_on_target
from framework.train.loop import evaluate, resolve_device, seed_everything
from framework.train.resume import resume_checkpoint

log = logging.getLogger(__name__)


def _run_dir(cfg: DictConfig, stage: str) -> Path:
    run_dir = cfg.get("run_dir")
    if not run_dir:
        run_dir = Path("outputs") / stage / time.strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_stage(cfg: DictConfig, stage: str) -> tuple[Path, torch.device]:
    """The run directory (created), torch threads, seeds and device every stage starts with."""
    run_dir = _run_dir(cfg, stage)
    _set_threads(cfg)
    seed_everything(int(cfg.seed))
    return run_dir, resolve_device(cfg.get("device", "auto"))


def load_full_precision_checkpoint(cfg: DictConfig, stage: str):
    """`cfg.init_checkpoint`, which must be a full-precision checkpoint of the target model."""
    if not cfg.get("init_checkpoint"):
        raise MPQError(f"{stage} needs init_checkpoint=<full-precision checkpoint of the target model> (from mpq pretrain)")
    ckpt = load_checkpoint(cfg.init_checkpoint)
    if ckpt.meta.get("quant"):
        raise MPQError(f"init_checkpoint {ckpt.path} is quantized; {stage} starts from the full-precision checkpoint")
    return ckpt


def _set_threads(cfg: DictConfig) -> None:
    """`threads`, or, for one of several torchrun processes on this node, an equal share of the cores
    (Slurm tasks are already bound to their own cores)."""
    import os

    threads = cfg.get("threads")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if not threads and local_world > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // local_world)
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
    """Full-precision training of `cfg.model` on the target data `cfg.data`, through DeepSpeed.

    SGD or AdamW with a cosine schedule on the global batch `train.batch_size` (split over
    `dist.nproc` processes and `dist.gradient_accumulation` steps), validation on the test split
    every `train.val_every` epochs, `checkpoints/last` after every epoch and `checkpoints/best` at
    the best validation top-1. `metrics.top1` is the top-1 of the final model on the test split.
    """
    stage = "pretrain"
    run_dir, device = prepare_stage(cfg, stage)
    train_set = build_dataset(cfg.data, "train")
    test_set = build_dataset(cfg.data, "test")
    num_classes = train_set.mpq_info["num_classes"]
    model_meta = _model_meta(cfg, num_classes)
    model = _build_model(model_meta, cfg.model.get("weights")).to(device)
    meta = {
        "stage": stage,
        "model": model_meta,
        "data": {"name": str(cfg.data.name), "input_size": cfg.data.input_size, "channels": int(cfg.data.channels)},
        "train_data": train_set.mpq_info,
        "code_version": __version__,
    }
    ckpt_dir = run_dir / "checkpoints"
    with open_process_group(device, cfg.dist.get("backend", "auto"), cfg.dist.get("timeout_min", 30)) as ranks:
        log.info("pretrain %s on %s: %d train / %d test samples, device %s, rank %d of %d",
                 model_meta["name"], cfg.data.name, len(train_set), len(test_set), device, ranks.rank, ranks.world_size)
        resume = resume_checkpoint(cfg, run_dir)
        tracker = open_tracker(cfg, stage, main=ranks.is_main)
        started = time.time()
        try:
            trained = train_on_target(cfg, model=model, train_set=train_set, test_set=test_set, data_cfg=cfg.data,
                                      train_cfg=cfg.train, batch_key="train.batch_size", meta=meta, run_dir=run_dir,
                                      device=device, ranks=ranks, tracker=tracker, resume=resume)
        finally:
            tracker.close()
    fitted = trained.fitted
    metrics = {
        "top1": fitted.final["top1"],
        "loss": fitted.final["loss"],
        "best_top1": fitted.best["top1"],
        "best_epoch": fitted.best.get("epoch"),
        "steps": fitted.steps,
        "epochs": len(fitted.history),
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "global_batch": trained.geometry.global_batch,
        "seconds": round(time.time() - started, 2),
    }
    result = Result(
        stage,
        metrics=metrics,
        artifacts={"checkpoint": str(ckpt_dir / "last"), "best_checkpoint": str(ckpt_dir / "best")},
        extra={"history": fitted.history, "data": train_set.mpq_info, "tracking": tracker.info(),
               **_distribution(trained, cfg)},
    )
    if ranks.is_main:
        write_result(run_dir, result, cfg)
    return result


def _distribution(trained, cfg: DictConfig) -> dict[str, Any]:
    """What result.json records of how a run was distributed."""
    g = trained.geometry
    return {"world_size": g.world_size, "distributed": {
        "world_size": g.world_size, "micro_batch": g.micro_batch, "gradient_accumulation": g.accumulation,
        "global_batch": g.global_batch, "zero_stage": int(cfg.dist.get("zero_stage", 0)), "engine": "deepspeed"}}


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
def calibrate(model, loader, device) -> None:
    """Initialise data-dependent quantizers (LSQ step sizes) on one training batch (LSQ's init)."""
    model.eval()
    images, _ = next(iter(loader))
    model(images.to(device))


def run_evaluate(cfg: DictConfig) -> Result:
    """Top-1 of the checkpoint at `cfg.checkpoint` on the test split of `cfg.data`, with its cost.

    The model and the input geometry (size, channels) come from the checkpoint, the dataset from
    `cfg.data`. A quantized checkpoint is evaluated under its own policy; `policy=uniform:W/A` or
    `policy=<policy.json>` quantizes a full-precision checkpoint after training (LSQ steps initialised
    on one training batch). BitOps and size are at the checkpoint's input size.
    """
    stage = "evaluate"
    if not cfg.get("checkpoint"):
        raise MPQError("evaluate needs checkpoint=<checkpoint directory>, e.g. checkpoint=outputs/pretrain/<run>/checkpoints/last")
    run_dir, device = prepare_stage(cfg, stage)
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
        calibrate(model, build_loader(calib, cfg.train.batch_size, True, data_cfg, seed=int(cfg.seed)), device)
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
    total_params = float_parameter_count(model)  # quantizer steps and ranges are not counted
    if policy is None:  # a float model: trace it as it is
        traced = trace_layers(model, geometry.input_size, geometry.in_channels)
        policy_metrics = policy_cost(traced, {layer.name: (32, 32) for layer in traced}, total_params)
    else:
        policy_metrics = policy_cost(layers, policy.bits(), total_params)
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


def run_finetune(cfg: DictConfig) -> Result:
    """Quantization-aware fine-tuning of the target model under `cfg.policy` from `cfg.init_checkpoint`.

    The policy (a `policy.json` or `uniform:W/A`) is validated against the model; LSQ quantizers
    (`cfg.quant`) are initialised on one training batch (the same on every rank); training runs
    through DeepSpeed on the global batch `finetune.batch_size` with SGD/AdamW and a cosine
    schedule, or a two-pass rule (`finetune.sharpness`: SAQ cases 1-3, SAM, ASAM, ASGA; `period` k
    for the periodic variant; see :class:`framework.sharpness.EngineTwoPass` for its meaning under
    data parallelism). Checkpoints record the policy and quantizer state, so `mpq evaluate`
    rebuilds the model. `metrics`: top-1 on the target's test split, BitOps and size at the
    target input size.
    """
    stage = "finetune"
    fcfg = cfg.finetune
    if not cfg.get("policy"):
        raise MPQError("finetune needs policy=<policy.json from mpq search> or policy=uniform:W/A")
    ckpt = load_full_precision_checkpoint(cfg, stage)
    run_dir, device = prepare_stage(cfg, stage)
    model_meta = ckpt.meta["model"]
    geometry = _checkpoint_geometry(ckpt, cfg)
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.input_size, data_cfg.channels = geometry.input_size, geometry.in_channels
    train_set, test_set = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "test")
    if train_set.mpq_info["num_classes"] != model_meta["num_classes"]:
        raise MPQError(f"checkpoint {ckpt.path} predicts {model_meta['num_classes']} classes but data '{cfg.data.name}' "
                       f"has {train_set.mpq_info['num_classes']}; fine-tune on the target it was trained on")

    policy, layers = resolve_policy(str(cfg.policy), model_meta["name"], lambda: _build_model(model_meta), geometry, cfg.quant)
    model = _build_model(model_meta)
    load_model_state(model, ckpt)
    quantize_with_policy(model, policy, cfg.quant, layers)
    model.to(device)
    calibrate(model, build_loader(train_set, int(fcfg.batch_size), True, data_cfg, seed=int(cfg.seed)), device)

    q_meta = quant_meta(policy, cfg.quant)
    meta = {"stage": stage, "model": model_meta, "data": {"name": str(cfg.data.name), "input_size": geometry.input_size,
            "channels": geometry.in_channels}, "quant": q_meta, "init_checkpoint": str(ckpt.path), "code_version": __version__}
    sharp = fcfg.sharpness
    with open_process_group(device, cfg.dist.get("backend", "auto"), cfg.dist.get("timeout_min", 30)) as ranks:
        resume = resume_checkpoint(cfg, run_dir)
        tracker = open_tracker(cfg, stage, main=ranks.is_main)
        artifacts = write_policy(policy, run_dir / "policy.json") if ranks.is_main else {}
        log.info("finetune %s on %s under %s: %.4f GBitOps, sharpness %s, rank %d of %d", model_meta["name"],
                 cfg.data.name, cfg.policy, policy.cost["target"].gbitops, sharp.get("name"), ranks.rank, ranks.world_size)
        started = time.time()
        try:
            if ranks.is_main:
                tracker.track_image("policy", artifacts["policy_plot"], step=0, subset="train")
            trained = train_on_target(cfg, model=model, train_set=train_set, test_set=test_set, data_cfg=data_cfg,
                                      train_cfg=fcfg, batch_key="finetune.batch_size", meta=meta, run_dir=run_dir,
                                      device=device, ranks=ranks, tracker=tracker, resume=resume, sharpness=sharp)
        finally:
            tracker.close()
    fitted = trained.fitted
    cost = policy.cost["target"]
    metrics = {"top1": fitted.final["top1"], "loss": fitted.final["loss"], "best_top1": fitted.best["top1"],
               "bitops": cost.bitops, "gbitops": cost.gbitops, "size_mb": cost.size_mb, "input_size": geometry.input_size,
               **{f"avg_{k}": v for k, v in policy.average_bits().items()}, "steps": fitted.steps,
               "global_batch": trained.geometry.global_batch, "seconds": round(time.time() - started, 2)}
    artifacts.update(checkpoint=str(run_dir / "checkpoints" / "last"), best_checkpoint=str(run_dir / "checkpoints" / "best"))
    result = Result(stage, metrics=metrics, artifacts=artifacts,
                    extra={"history": fitted.history, "data": train_set.mpq_info, "tracking": tracker.info(),
                           **_distribution(trained, cfg)})
    if ranks.is_main:
        write_result(run_dir, result, cfg)
    return result


def run_search(cfg: DictConfig) -> Result:
    """Search a mixed-precision policy on the proxy data (framework.search.loop.run_search)."""
    from framework.search.loop import run_search as search

    return search(cfg)


def _not_available(stage: str):
    def run(cfg: DictConfig) -> Result:
        raise StageNotAvailable(stage)

    run.__name__ = f"run_{stage}"
    run.__doc__ = f"The `{stage}` stage (not available yet in this version)."
    return run


def run_prepare(cfg: DictConfig) -> Result:
    """Write the FFCV `.beton` files `data.loader=ffcv` reads: the `prepare.splits` of `cfg.data`
    (and of `cfg.proxy` with `prepare.proxy=true`), with the write options of `data.ffcv.write`
    (`proxy.ffcv.write` for the proxy's). A proxy that reads the data's own files is written once.

    Files that exist, are whole and were written with the same options are skipped unless
    `prepare.force=true` (:func:`framework.data.beton.write_beton`). `artifacts` maps
    `<dataset>_<split>` to each file; `metrics` counts the files written and skipped.
    """
    from framework.data.beton import prepare_betons

    stage = "prepare"
    run_dir = _run_dir(cfg, stage)
    pcfg = cfg.get("prepare") or {}
    splits, force = list(pcfg.get("splits") or ("train", "test")), bool(pcfg.get("force", False))
    started = time.time()
    reports = prepare_betons(cfg.data, splits, force)
    if pcfg.get("proxy"):
        done = {r["path"] for r in reports}
        reports += [r for r in prepare_betons(cfg.proxy, splits, force) if r["path"] not in done]
    metrics = {"written": sum(r["status"] == "written" for r in reports),
               "skipped": sum(r["status"] == "skipped" for r in reports),
               "bytes": sum(int(r["bytes"]) for r in reports), "seconds": round(time.time() - started, 2)}
    result = Result(stage, metrics=metrics, artifacts={f"{r['dataset']}_{r['split']}": r["path"] for r in reports},
                    extra={"files": reports})
    write_result(run_dir, result, cfg)
    return result


def run_sweep(cfg: DictConfig) -> Result:
    """Many proxy searches as one Ray Tune sweep, and the policy picked from them
    (framework.tune.sweep.run_sweep)."""
    from framework.tune.sweep import run_sweep as sweep

    return sweep(cfg)


run_export = _not_available("export")


def _sub_config(cfg: DictConfig, run_dir: Path, **updates: Any) -> DictConfig:
    sub = cfg.copy()
    with open_dict(sub):
        sub.run_dir = str(run_dir)
        for key, value in updates.items():
            OmegaConf.update(sub, key, value, force_add=True)
    return sub


#: the stages `pipeline` chains, in order
PIPELINE_STAGES = ("pretrain", "search", "finetune", "evaluate")


def run_pipeline(cfg: DictConfig) -> Result:
    """The default run, each stage in its own sub-folder, then one summary table.

    pretrain (full precision, target data) -> search (policy on the proxy data, from the pretrained
    checkpoint) -> finetune (the target model under the searched policy) -> evaluate (the quantized
    checkpoint). `pipeline.policy=uniform:W/A` (or a policy file) skips the search and fine-tunes
    that policy instead, for baselines. `pipeline.sweep=true` runs a Ray Tune sweep (`tune.*`,
    framework.tune) in place of the single search and fine-tunes and evaluates the `tune.top_k`
    best policies under the budget (by proxy top-1): the first in `finetune/` and `evaluate/`, the
    others in `finetune_top<i>/` and `evaluate_top<i>/`. The summary's headline is the sweep's
    selected policy (the best on the proxy); the others are listed beside it, since picking among
    them by their test top-1 would select on the test split.
    """
    stage = "pipeline"
    run_dir = _run_dir(cfg, stage)
    rows: list[dict[str, Any]] = []
    artifacts: dict[str, str] = {}

    def timed(name: str, fn, sub_cfg) -> Result:
        started = time.time()
        result = fn(sub_cfg)
        rows.append({"stage": name, "seconds": time.time() - started, "metrics": result.metrics})
        return result

    pre = timed("pretrain", run_pretrain, _sub_config(cfg, run_dir / "pretrain"))
    fp_checkpoint = pre.artifacts["checkpoint"]
    fixed_policy = OmegaConf.select(cfg, "pipeline.policy")
    policy_stage = None
    candidates: list[dict[str, Any]] = []  # the policies to fine-tune, best first
    if fixed_policy:
        candidates.append({"policy": str(fixed_policy)})
    elif OmegaConf.select(cfg, "pipeline.sweep", default=False):
        policy_stage = "sweep"
        swept = timed("sweep", run_sweep, _sub_config(cfg, run_dir / "sweep", init_checkpoint=fp_checkpoint))
        artifacts.update(policy=swept.artifacts["policy"], pareto_plot=swept.artifacts["pareto_plot"])
        for rank, top in enumerate(swept.extra["selection"]["top"]):
            # the best is the sweep's policy.json, which adds the sweep's provenance to the trial's
            policy = swept.artifacts["policy"] if rank == 0 else top["policy"]
            candidates.append({"trial": top["key"], "policy": policy, "proxy_top1": top["proxy_top1"],
                               "proxy_bitops": top["bitops"]})
    else:
        policy_stage = "search"
        found = timed("search", run_search, _sub_config(cfg, run_dir / "search", init_checkpoint=fp_checkpoint))
        artifacts["policy"] = found.artifacts["policy"]
        candidates.append({"policy": found.artifacts["policy"]})
    for rank, candidate in enumerate(candidates):
        suffix = "" if rank == 0 else f"_top{rank + 1}"
        fine = timed(f"finetune{suffix}", run_finetune, _sub_config(
            cfg, run_dir / f"finetune{suffix}", init_checkpoint=fp_checkpoint, policy=candidate["policy"]))
        evaluated = timed(f"evaluate{suffix}", run_evaluate,
                          _sub_config(cfg, run_dir / f"evaluate{suffix}", checkpoint=fine.artifacts["checkpoint"]))
        candidate.update(checkpoint=fine.artifacts["checkpoint"], top1=evaluated.metrics["top1"],
                         gbitops=evaluated.metrics["gbitops"])
        if rank == 0:
            ev = evaluated
            artifacts.update(fp_checkpoint=fp_checkpoint, checkpoint=fine.artifacts["checkpoint"])

    metrics = {
        "fp_top1": pre.metrics["top1"],
        "top1": ev.metrics["top1"],
        "gbitops": ev.metrics["gbitops"],
        "size_mb": ev.metrics["size_mb"],
        "avg_w_bits": ev.metrics.get("avg_w_bits"),
        "avg_a_bits": ev.metrics.get("avg_a_bits"),
        "seconds": round(sum(r["seconds"] for r in rows), 2),
        "stage_seconds": {r["stage"]: round(r["seconds"], 2) for r in rows},
    }
    extra: dict[str, Any] = {"stages": [{"stage": r["stage"], "seconds": r["seconds"]} for r in rows], "run_dir": str(run_dir)}
    if policy_stage is not None:
        metrics["proxy_top1"] = rows[1]["metrics"].get("proxy_top1")
    if policy_stage == "sweep":
        metrics["selected_trial"] = rows[1]["metrics"]["selected_trial"]
        extra["finetuned"] = candidates
    result = Result(stage, metrics=metrics, artifacts=artifacts, extra=extra)
    write_result(run_dir, result, cfg)
    print(format_summary(cfg, metrics, rows, run_dir, policy_stage, candidates))
    return result


def _stage_note(stage: str, m: dict[str, Any]) -> str:
    if stage == "search":
        repaired = " (repaired to budget)" if m.get("repair_applied") else ""
        return f"proxy top-1 {100 * m['proxy_top1']:.2f} %, {m['gbitops']:.4f} GBitOps{repaired}"
    if stage == "sweep":
        return (f"{m['finished']} of {m['trials']} trials finished ({m['stopped']} stopped early); selected trial "
                f"{m['selected_trial']}: proxy top-1 {100 * m['proxy_top1']:.2f} %, {m['gbitops']:.4f} GBitOps")
    if stage.startswith("evaluate"):
        return f"top-1 {100 * m['top1']:.2f} % on {m['samples']} test images"
    return f"top-1 {100 * m['top1']:.2f} % ({m['steps']} steps)"


def format_summary(cfg: DictConfig, metrics: dict[str, Any], rows: list[dict[str, Any]], run_dir: Path,
                   policy_stage: str | None = "search", candidates: list[dict[str, Any]] | None = None) -> str:
    """The table `mpq pipeline` prints at the end."""
    method = {None: "fixed policy", "search": str(cfg.search.method)}.get(policy_stage, "Ray Tune sweep")
    lines = [
        "",
        f"mpq pipeline summary: {cfg.model.name} on {cfg.data.name}, policy searched on {cfg.proxy.name} ({method})",
        f"  full-precision top-1   {100 * metrics['fp_top1']:6.2f} %",
        f"  policy                 W {metrics['avg_w_bits']:.2f} / A {metrics['avg_a_bits']:.2f} bits on average "
        f"(searched layers, MAC-weighted), {metrics['gbitops']:.4f} GBitOps, {metrics['size_mb']:.4f} MB",
        f"  quantized top-1        {100 * metrics['top1']:6.2f} %",
        "",
        f"  {'stage':<14}{'time (s)':>10}   result",
    ]
    for row in rows:
        note = _stage_note(row["stage"], row["metrics"])
        lines.append(f"  {row['stage']:<14}{row['seconds']:>10.1f}   {note}")
    lines.append(f"  {'total':<14}{sum(r['seconds'] for r in rows):>10.1f}")
    if policy_stage == "sweep" and len(candidates or []) > 1:
        lines += ["", f"  {'policy':<8}{'trial':<14}{'proxy top-1':>12}{'GBitOps':>10}{'top-1':>10}   (best on the proxy first)"]
        for rank, c in enumerate(candidates or []):
            lines.append(f"  #{rank + 1:<7}{c['trial']:<14}{100 * c['proxy_top1']:>10.2f} %{c['gbitops']:>10.4f}"
                         f"{100 * c['top1']:>8.2f} %")
    where = {"search": "search/policy.json, ", "sweep": "sweep/policy.json, sweep/pareto.png, "}.get(policy_stage, "")
    lines.append(f"outputs: {run_dir}  (result.json; pretrain/, {where}finetune/checkpoints/)")
    return "\n".join(lines)


