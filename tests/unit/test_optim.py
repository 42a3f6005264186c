"""The warm-up + cosine schedule and the optimizer parameter groups."""

import math

import pytest
import torch

from framework.errors import MPQError
from framework.models import create_model
from framework.train.optim import build_optimizer, build_scheduler, cosine_with_warmup
from tests.conftest import compose_config


def optim_config(*overrides: str):
    """The `train.optim` node `mpq pretrain train.optim.<key>=<value> ...` would use."""
    return compose_config("pretrain", [f"train.optim.{o}" for o in overrides]).train.optim


def test_cosine_with_warmup_closed_form():
    assert cosine_with_warmup(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(100, 100, 0, 0.1) == pytest.approx(0.1)
    t = 30
    assert cosine_with_warmup(t, 100, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / 100)))


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(3, 2)
    cfg = optim_config("name=sgd", "lr=0.2", "weight_decay=1e-4", "warmup_fraction=0.0", "min_lr_ratio=0.0")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, total_steps=4, optim_cfg=cfg)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)])


def test_no_weight_decay_on_biases_and_batch_norm():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    cfg = optim_config("name=adamw", "lr=1e-3", "weight_decay=0.05")
    opt = build_optimizer(model, cfg)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def test_unknown_optimizer():
    with pytest.raises(MPQError, match="sgd or adamw"):
        build_optimizer(torch.nn.Linear(2, 2), optim_config("name=lion"))
