"""`mpq pretrain`: the full-precision model on the target data."""

from __future__ import annotations

from omegaconf import DictConfig

from framework import __version__
from framework.data import build_dataset, validation_split
from framework.results import Result
from framework.stage import build_model, model_meta, start_stage
from framework.stages.training import TrainingJob, run_training_stage


def run_pretrain(cfg: DictConfig) -> Result:
    """Full-precision training of `cfg.model` on the target data `cfg.data`, through DeepSpeed.

    SGD or AdamW with a cosine schedule on the global batch `train.batch_size` (split over
    `dist.nproc` processes and `dist.gradient_accumulation` steps), validation on the test split
    every `train.val_every` epochs, `checkpoints/last` after every epoch and `checkpoints/best` at
    the best validation top-1. `metrics.top1` is the top-1 of the final model on the test split.
    """
    run_dir, device = start_stage(cfg, "pretrain")
    train_set, test_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    meta = model_meta(cfg, train_set.mpq_info["num_classes"])
    model = build_model(meta, cfg.model.weights).to(device)
    job = TrainingJob(
        stage="pretrain", model=model, train_set=train_set, test_set=test_set, data_cfg=cfg.data,
        val_set=build_dataset(cfg.data, "val") if validation_split(cfg.data) == "val" else None,
        train_cfg=cfg.train, batch_key="train.batch_size",
        meta={"stage": "pretrain", "model": meta,
              "data": {"name": str(cfg.data.name), "input_size": cfg.data.input_size, "channels": int(cfg.data.channels)},
              "train_data": train_set.mpq_info, "code_version": __version__},
        description=f"pretrain {meta['name']} on {cfg.data.name}: {len(train_set)} train / {len(test_set)} test samples",
    )
    return run_training_stage(cfg, job, run_dir, device)
