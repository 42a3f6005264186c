"""Shared fixtures: the real configs composed and shrunk, the `mpq` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from framework.paths import CONF_DIR, REPO_ROOT

MPQ = str(Path(sys.executable).parent / "mpq")


def compose_config(stage: str = "pretrain", overrides: list[str] | None = None):
    """The config `mpq <stage> overrides...` would run, composed through Hydra's API."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*(overrides or []), f"stage={stage}"])
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """A pretrain config shrunk for tests: small subsets, few steps, tracking into tmp_path."""

    def make(*overrides: str):
        cfg = compose_config(
            "pretrain",
            [
                "data.fraction=0.02",
                "data.test_fraction=0.05",
                "train.max_steps=5",
                "train.epochs=1",
                f"tracking.repo={tmp_path / 'aim'}",
                *overrides,
            ],
        )
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / "run")
        return cfg

    return make


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_mpq(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> Completed:
    """Run the installed `mpq` console script and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [MPQ, *args], cwd=cwd or REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def checkpoint_step(run_dir: Path) -> int:
    """The step of `run_dir/checkpoints/last` (-1 while there is none, or it is being replaced)."""
    try:
        return json.loads((Path(run_dir) / "checkpoints" / "last" / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
    """The acceptance command of the spine, run once: `mpq pretrain data.fraction=0.05 model=resnet8 train.epochs=1`."""
    base = tmp_path_factory.mktemp("pretrain_cli")
    run_dir, aim_repo = base / "run", base / "aim"
    proc = run_mpq(
        "pretrain",
        "data=fashion_mnist",
        "data.fraction=0.05",
        "model=resnet8",
        "train.epochs=1",
        f"hydra.run.dir={run_dir}",
        f"tracking.repo={aim_repo}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run_dir": run_dir, "aim_repo": aim_repo, "proc": proc, "result": read_json(run_dir / "result.json")}


def make_image_tree(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 30),
                    suffix: str = ".jpg") -> Path:
    """A tiny ImageFolder tree, `root/{train,val}/class_<c>/<i><suffix>`, of random RGB pixels
    (every image unique; `.png` keeps them lossless), `size` being (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}{suffix}")
    return Path(root)
