"""`mpq finetune`: quantization-aware training of the target model under a transferred policy."""

from __future__ import annotations

from omegaconf import DictConfig

from framework import __version__
from framework.data import build_dataset, build_loader, validation_split
from framework.errors import MPQError
from framework.policy import write_policy
from framework.results import Result
from framework.stage import (
    build_model,
    calibrate,
    check_classes,
    checkpoint_geometry,
    data_config_at,
    full_precision_reference,
    load_full_precision_checkpoint,
    quant_meta,
    quantize_with_policy,
    resolve_policy,
    start_stage,
)
from framework.stages.training import TrainingJob, run_training_stage
from framework.train.checkpoint import load_model_state


def run_finetune(cfg: DictConfig) -> Result:
    """Quantization-aware fine-tuning of the target model under `cfg.policy` from `cfg.init_checkpoint`.

    The policy (a `policy.json`, `uniform:W/A`, `random:<seed>` or `uniform-budget`) is validated
    against the model; LSQ quantizers (`cfg.quant`) are initialised on one training batch (the same on every rank); training runs
    through DeepSpeed on the global batch `finetune.batch_size` with SGD/AdamW and a cosine
    schedule, or a two-pass rule (`finetune.sharpness`: SAQ cases 1-3, SAM, ASAM, ASGA; `period` k
    for the periodic variant; see :class:`framework.sharpness.EngineTwoPass` for its meaning under
    data parallelism). Checkpoints record the policy and quantizer state, so `mpq evaluate`
    rebuilds the model. `metrics`: top-1 on the target's test split, BitOps and size at the
    target input size.
    """
    if not cfg.policy:
        raise MPQError("finetune needs policy=<policy.json from mpq search> or policy=uniform:W/A")
    ckpt = load_full_precision_checkpoint(cfg, "finetune")
    run_dir, device = start_stage(cfg, "finetune")
    meta = ckpt.meta["model"]
    geometry = checkpoint_geometry(ckpt, cfg)
    data_cfg = data_config_at(cfg.data, geometry)
    train_set, test_set = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "test")
    check_classes(ckpt, train_set.mpq_info, str(cfg.data.name), "fine-tune on the target it was trained on")

    model = build_model(meta)
    load_model_state(model, ckpt)
    policy, layers = resolve_policy(str(cfg.policy), meta["name"], lambda: build_model(meta), geometry, cfg.quant,
                                    search_cfg=cfg.search,
                                    reference=full_precision_reference(model, cfg, data_cfg, device))
    quantize_with_policy(model, policy, cfg.quant, layers)
    model.to(device)
    calibrate(model, build_loader(train_set, int(cfg.finetune.batch_size), True, data_cfg, seed=int(cfg.seed)), device)

    def on_start(ranks, tracker) -> dict[str, str]:
        if not ranks.is_main:
            return {}
        artifacts = write_policy(policy, run_dir / "policy.json")
        tracker.track_image("policy", artifacts["policy_plot"], step=0, subset="train")
        return artifacts

    cost = policy.cost["target"]
    job = TrainingJob(
        stage="finetune", model=model, train_set=train_set, test_set=test_set, data_cfg=data_cfg,
        val_set=build_dataset(data_cfg, "val") if validation_split(data_cfg) == "val" else None,
        train_cfg=cfg.finetune, batch_key="finetune.batch_size", sharpness=cfg.finetune.sharpness,
        meta={"stage": "finetune", "model": meta,
              "data": {"name": str(cfg.data.name), "input_size": geometry.input_size, "channels": geometry.in_channels},
              "quant": quant_meta(policy, cfg.quant), "init_checkpoint": str(ckpt.path), "code_version": __version__},
        description=(f"finetune {meta['name']} on {cfg.data.name} under {cfg.policy}: {cost.gbitops:.4f} GBitOps, "
                     f"sharpness {cfg.finetune.sharpness.name}"),
        metrics={"bitops": cost.bitops, "gbitops": cost.gbitops, "size_mb": cost.size_mb,
                 "input_size": geometry.input_size, **{f"avg_{k}": v for k, v in policy.average_bits().items()}},
        on_start=on_start,
    )
    return run_training_stage(cfg, job, run_dir, device)
