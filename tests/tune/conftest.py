"""Sweeps on a tiny proxy: ResNet-8 from the session's pretrained checkpoint, a few hundred MNIST
images, 10 steps per epoch, 1 CPU per trial, Ray on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from tests.conftest import compose_config

TINY_TRIAL = [
    "proxy.per_class=15",        # 150 MNIST images: 10 steps of 15 per epoch
    "proxy.test_fraction=0.02",  # 200 test images
    "proxy.val_fraction=0.004",  # 240 held-out training images: the proxy top-1 a sweep selects by
    "search.batch_size=15",
    "tune.cpus_per_trial=1",
    "tune.max_concurrent=2",
]


def sweep_config(run_dir: Path, checkpoint: str, *overrides: str):
    """The config `mpq sweep` would run, shrunk, writing into `run_dir`."""
    cfg = compose_config("sweep", [f"init_checkpoint={checkpoint}", *TINY_TRIAL, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def embedded_ray():
    """Ray started the way a sweep starts it (127.0.0.1, 2 CPUs, no dashboard), shared by the module."""
    from framework.tune.cluster import ray_session

    with ray_session(OmegaConf.create({"address": None, "num_cpus": 2, "num_gpus": None})) as info:
        assert info["mode"] == "embedded"
        yield info
