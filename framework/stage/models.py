"""The models stages work on: built from the config, or rebuilt from a checkpoint with the input
geometry and class count it was trained with."""

from __future__ import annotations

import itertools
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.data import build_dataset, build_loader, validation_split
from framework.errors import MPQError
from framework.models import create_model
from framework.policy import policy_from_dict, validate_policy
from framework.quant.cost import trace_layers
from framework.stage.policies import Geometry, Reference, calibrate, quantize_with_policy, resolve_policy
from framework.train.checkpoint import Checkpoint, load_checkpoint, load_model_state


def model_meta(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild `cfg.model`: name, classes, input channels, options."""
    options = OmegaConf.to_container(cfg.model.options, resolve=True)
    return {"name": str(cfg.model.name), "num_classes": int(num_classes), "in_channels": int(cfg.data.channels),
            "options": options}


def build_model(meta: dict[str, Any], weights: str | None = None):
    """The float model `meta` (from :func:`model_meta` or a checkpoint) describes."""
    return create_model(meta["name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        weights=weights, **meta["options"])


def checkpoint_geometry(ckpt: Checkpoint, cfg: DictConfig) -> Geometry:
    """The input size and channels a checkpoint was trained at (the data config's if it says nothing)."""
    data = ckpt.meta.get("data", {})
    return Geometry(int(data.get("input_size") or cfg.data.input_size or 28),
                    int(data.get("channels") or cfg.data.channels))


def data_config_at(data_cfg: DictConfig, geometry: Geometry) -> DictConfig:
    """A copy of a data config that feeds images of `geometry` (a checkpoint's)."""
    out = data_cfg.copy()
    with open_dict(out):
        out.input_size, out.channels = geometry.input_size, geometry.in_channels
    return out


def check_classes(ckpt: Checkpoint, dataset_info: dict[str, Any], data_name: str, fix: str) -> None:
    """One error when the checkpoint's classifier and the dataset disagree on the class count."""
    expected, found = ckpt.meta["model"]["num_classes"], dataset_info["num_classes"]
    if expected != found:
        raise MPQError(f"checkpoint {ckpt.path} predicts {expected} classes but dataset '{data_name}' has {found}; {fix}")


def load_full_precision_checkpoint(cfg: DictConfig, stage: str) -> Checkpoint:
    """`cfg.init_checkpoint`, which must be a full-precision checkpoint of the target model."""
    if not cfg.init_checkpoint:
        raise MPQError(f"{stage} needs init_checkpoint=<full-precision checkpoint of the target model> (from mpq pretrain)")
    ckpt = load_checkpoint(cfg.init_checkpoint)
    if ckpt.meta.get("quant"):
        raise MPQError(f"init_checkpoint {ckpt.path} is quantized; {stage} starts from the full-precision checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: Checkpoint, cfg: DictConfig):
    """The model a checkpoint holds, quantized as its `meta.quant` says, with its weights loaded.

    Returns `(model, policy or None, layers or None)`.
    """
    meta = ckpt.meta["model"]
    quant = ckpt.meta.get("quant")
    model = build_model(meta)
    policy = layers = None
    if quant:
        policy = policy_from_dict(quant["policy"], f"the policy in checkpoint {ckpt.path}")
        geometry = checkpoint_geometry(ckpt, cfg)
        layers = trace_layers(model, geometry.input_size, geometry.in_channels)
        validate_policy(policy, meta["name"], layers, f"the policy in checkpoint {ckpt.path}")
        # a checkpoint's quantizer config wins; `quant` keys it lacks take this config's values, so a
        # checkpoint whose quantizer config holds fewer keys still loads
        qcfg = OmegaConf.merge(OmegaConf.to_container(cfg.quant, resolve=True), quant["config"])
        quantize_with_policy(model, policy, qcfg, layers)
    load_model_state(model, ckpt)
    return model, policy, layers


def full_precision_reference(model, cfg: DictConfig, data_cfg: DictConfig, device, train_set=None) -> Reference:
    """The :class:`Reference` `policy=hawq` and `policy=sensitivity` measure: the full-precision
    `model` (its trained weights loaded) and the first `sensitivity.batches` batches of
    `sensitivity.batch_size` images, seed `seed`, of the held-out validation split when there is
    one (`data.val_fraction`: choosing a policy is a selection), else of `train_set` (the training
    split without augmentation when not given); loaded only when a policy needs them."""
    settings = cfg.sensitivity

    def batches():
        if validation_split(data_cfg) == "val":
            data = build_dataset(data_cfg, "val")
        else:
            data = train_set if train_set is not None else build_dataset(data_cfg, "train", train_transforms=False)
        loader = build_loader(data, int(settings.batch_size), True, data_cfg, seed=int(cfg.seed))
        return [(images.to(device), labels.to(device)) for images, labels in itertools.islice(loader, int(settings.batches))]

    return Reference(model, batches, device, probes=int(settings.probes), seed=int(cfg.seed),
                     hold_graphs=bool(settings.hold_graphs))


def checkpoint_model(ckpt: Checkpoint, cfg: DictConfig, data_cfg: DictConfig, device, train_set=None):
    """The model of a checkpoint on `device`, as `evaluate` and `landscape` score it: a quantized
    checkpoint under its own policy; a full-precision one as it is, or quantized after training under
    `cfg.policy` (`uniform:W/A` or a policy.json; LSQ steps initialised on one training batch of
    `train_set`, built from `data_cfg` when not given).

    Returns `(model, policy or None, layers or None)`.
    """
    model, policy, layers = model_from_checkpoint(ckpt, cfg)
    if cfg.policy:
        if policy is not None:
            raise MPQError(f"checkpoint {ckpt.path} is already quantized under its own policy; drop policy=")
        meta = ckpt.meta["model"]
        geometry = checkpoint_geometry(ckpt, cfg)
        calib = train_set if train_set is not None else build_dataset(data_cfg, "train", train_transforms=False)
        policy, layers = resolve_policy(str(cfg.policy), meta["name"], lambda: build_model(meta), geometry, cfg.quant,
                                        search_cfg=cfg.search,
                                        reference=full_precision_reference(model, cfg, data_cfg, device, calib))
        quantize_with_policy(model, policy, cfg.quant, layers)
        model.to(device)
        calibrate(model, build_loader(calib, cfg.train.batch_size, True, data_cfg, seed=int(cfg.seed)), device)
    return model.to(device), policy, layers
