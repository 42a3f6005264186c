"""Shared fixtures and helpers: the real configs composed and shrunk, the `mpq` command in a
subprocess and its one-line error contract, readers of what runs leave behind (result.json, policy
layers, checkpoints), waiting on a running command, free loopback ports and image trees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


@pytest.fixture(autouse=True)
def _restore_the_kernel_backend():
    """A stage run in-process chooses the process's kernel backend (framework.quant.kernels.use):
    each test starts from and leaves the one it found."""
    from framework.quant import kernels

    with kernels.using(kernels._REQUESTED, kernels._DEVICE):
        yield


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


def run_stage(stage: str, run_dir: Path, *args: str, env: dict | None = None, timeout: float = 600) -> dict:
    """`mpq <stage> args... hydra.run.dir=<run_dir>`, which must succeed; its result.json (status ok)."""
    proc = run_mpq(stage, *args, f"hydra.run.dir={run_dir}", env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(run_dir)
    assert result["stage"] == stage and result["status"] == "ok", result.get("error")
    return result


def run_mpq_in_process(*args: str) -> Completed:
    """`mpq args...` called in this process (launchers.cli.main, as the console script calls it): the
    exit status, stdout, stderr and run directory `run_mpq` gives, without a new interpreter's start-up
    (seconds: torch, Hydra). For commands that end before training a model for long: errors of the
    config, data or checkpoint, and short stages of the fast tier. The process's logging (Hydra
    configures it), torch thread count and sys.argv are restored afterwards."""
    import contextlib
    import io
    import logging

    import torch

    from launchers.cli import main

    root = logging.getLogger()
    handlers, level, argv, threads = list(root.handlers), root.level, list(sys.argv), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # the command's sys.exit(2), (143), ...
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.argv = argv
        torch.set_num_threads(threads)
    return Completed(code, out.getvalue(), err.getvalue())


def run_stage_in_process(stage: str, run_dir: Path, *args: str) -> dict:
    """`run_stage` through `run_mpq_in_process`: `mpq <stage> args... hydra.run.dir=<run_dir>` in this
    process, which must succeed; its result.json (status ok)."""
    proc = run_mpq_in_process(stage, *args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(run_dir)
    assert result["stage"] == stage and result["status"] == "ok", result.get("error")
    return result


def start_mpq(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`mpq args...` started in the background (stdout discarded, stderr kept), to be interrupted."""
    return subprocess.Popen([MPQ, *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_one_error_line(proc: Completed, stage: str | None, *fragments: str, run_dir: Path | None = None) -> str:
    """The error contract of the `mpq` command: exit status 2, no traceback, one line on stderr,
    `mpq <stage>: error: ...` (`mpq: error: ...` before a stage is known) holding every fragment;
    with `run_dir`, a result.json there with status error and that same message. Returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert len(proc.error_lines) == 1, proc.error_lines
    (line,) = proc.error_lines
    prefix = f"mpq {stage}: error: " if stage else "mpq: error: "
    assert line.startswith(prefix), line
    for fragment in fragments:
        assert fragment in line, line
    if run_dir is not None:
        result = read_result(run_dir)
        assert (result["stage"], result["status"], result["error"]) == (stage, "error", line[len(prefix):])
    return line


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_result(run_dir: Path) -> dict:
    """The result.json a stage left in `run_dir`."""
    return read_json(Path(run_dir) / "result.json")


def policy_layers(path: str | Path) -> dict:
    """The per-layer bits (and MACs, params) of a policy.json."""
    return read_json(Path(path))["layers"]


def checkpoint_step(run_dir: Path) -> int:
    """The step of `run_dir/checkpoints/last` (-1 while there is none, or it is being replaced)."""
    try:
        return json.loads((Path(run_dir) / "checkpoints" / "last" / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def checkpoint_weights(run_dir: Path) -> dict:
    """The model state of `run_dir/checkpoints/last`."""
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last" / "model.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    """The last checkpoints of the runs in `a` and `b` hold bit-identical tensors."""
    import torch

    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def trained_parameters(run_dir: Path) -> dict:
    """The floating-point tensors of `run_dir/checkpoints/last` but the batch-norm running statistics,
    which DeepSpeed leaves to each rank (rank 0's are saved)."""
    return {k: v for k, v in checkpoint_weights(run_dir).items() if v.is_floating_point() and "running_" not in k}


def assert_close_parameters(a: Path, b: Path, atol: float = 1e-6) -> None:
    """The trained parameters of the runs in `a` and `b` agree within `atol` (the distributed tests' tolerance)."""
    import torch

    wa, wb = trained_parameters(a), trained_parameters(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def end_process_group(proc: subprocess.Popen, term_wait: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, to the process group `proc` leads (started with start_new_session):
    both are sent, so members that outlive the leader end too."""
    import signal

    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def port_answers(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], object], proc: subprocess.Popen | None = None, timeout: float = 120.0,
             what: str = "the run") -> None:
    """Poll `predicate` until it holds; fail if `proc` ends first (with its stderr) or on timeout."""
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None:
            assert proc.poll() is None, f"{what} ended while it was awaited: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
    """The acceptance command of the spine, run once: `mpq pretrain data.fraction=0.05 model=resnet8 train.epochs=1`."""
    base = tmp_path_factory.mktemp("pretrain_cli")
    run_dir, aim_repo = base / "run", base / "aim"
    result = run_stage("pretrain", run_dir, "data=fashion_mnist", "data.fraction=0.05", "model=resnet8", "train.epochs=1",
                       f"tracking.repo={aim_repo}")
    return {"run_dir": run_dir, "aim_repo": aim_repo, "result": result}


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    """`mpq pipeline experiment=smoke`, run once for the session (the command test and the
    experiment test both check it): its run directory, Aim repository, overrides and the process."""
    base = tmp_path_factory.mktemp("smoke_pipeline")
    overrides = ["experiment=smoke", "pipeline.seeds=2", f"tracking.repo={base / 'aim'}"]
    proc = run_mpq("pipeline", *overrides, f"hydra.run.dir={base / 'run'}")
    return {"run_dir": base / "run", "aim_repo": base / "aim", "overrides": overrides, "proc": proc}


@pytest.fixture(scope="session")
def pretrained_checkpoint(pretrained_run) -> str:
    """`checkpoints/last` of the session's pretrained run."""
    return pretrained_run["result"]["artifacts"]["checkpoint"]


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


@pytest.fixture(scope="session")
def finetuned_run(pretrained_checkpoint, tmp_path_factory) -> dict:
    """`mpq finetune` of the session's pretrained model for a few steps under `policy=uniform:4/4` (LSQ),
    run once: its run directory and result.json."""
    run_dir = tmp_path_factory.mktemp("finetune_cli") / "run"
    result = run_stage("finetune", run_dir, f"init_checkpoint={pretrained_checkpoint}", "policy=uniform:4/4",
                       "data.fraction=0.02", "data.test_fraction=0.05", "finetune.max_steps=3", "tracking.enabled=false")
    return {"run_dir": run_dir, "result": result}


@pytest.fixture(scope="session")
def finetuned_checkpoint(finetuned_run) -> str:
    """A quantized checkpoint: `checkpoints/last` of the session's fine-tuned run."""
    return finetuned_run["result"]["artifacts"]["checkpoint"]
