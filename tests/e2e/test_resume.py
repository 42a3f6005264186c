"""A killed run resumes where it was: same steps, same data order, same final weights."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from framework.paths import REPO_ROOT
from tests.conftest import MPQ, checkpoint_step, read_json, run_mpq

ARGS = ["pretrain", "data.fraction=0.05", "data.test_fraction=0.05", "train.epochs=3", "tracking.enabled=false"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last" / "model.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_mpq(*ARGS, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([MPQ, *ARGS, f"hydra.run.dir={run_dir}", *extra], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, uninterrupted):
    proc = _start(tmp_path, "checkpoint_every=5")
    _wait_for(lambda: checkpoint_step(tmp_path) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint_step(tmp_path)
    total = read_json(uninterrupted / "result.json")["metrics"]["steps"]
    assert 5 <= killed_at < total

    resumed = run_mpq(*ARGS, f"hydra.run.dir={tmp_path}", "checkpoint_every=5", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {killed_at}" in (tmp_path / "pretrain.log").read_text()
    result, reference = read_json(tmp_path / "result.json"), read_json(uninterrupted / "result.json")
    assert result["metrics"]["steps"] == reference["metrics"]["steps"]
    assert result["metrics"]["top1"] == reference["metrics"]["top1"]
    _assert_same_weights(tmp_path, uninterrupted)


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path, uninterrupted):
    proc = _start(tmp_path)  # no periodic checkpoints: only the signal can write one mid-epoch
    _wait_for(lambda: (tmp_path / "pretrain.log").exists() and "pretrain resnet8" in (tmp_path / "pretrain.log").read_text(), proc)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "resume=true" in stderr
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "interrupted"
    state = torch.load(tmp_path / "checkpoints" / "last" / "training.pt", weights_only=True)
    assert state["position"]["step"] == result["step"] > 0

    resumed = run_mpq(*ARGS, f"hydra.run.dir={tmp_path}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_json(tmp_path / "result.json")["status"] == "ok"
    _assert_same_weights(tmp_path, uninterrupted)


def test_asga_search_resumes_with_its_radius_and_gives_the_same_policy(tmp_path, pretrained_run):
    args = ["search", "search=seam_asga", f"init_checkpoint={pretrained_run['result']['artifacts']['checkpoint']}",
            "proxy.per_class=30", "proxy.test_fraction=0.05", "search.batch_size=30", "search.epochs=2",
            "tracking.enabled=false", "checkpoint_every=3"]
    reference = tmp_path / "reference"
    proc = run_mpq(*args, f"hydra.run.dir={reference}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    run_dir = tmp_path / "killed"
    killed = subprocess.Popen([MPQ, *args, f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: checkpoint_step(run_dir) >= 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert 3 <= checkpoint_step(run_dir) < 20
    resumed = run_mpq(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = read_json(reference / "result.json"), read_json(run_dir / "result.json")
    assert a["metrics"]["rho"] == b["metrics"]["rho"]
    assert a["metrics"]["expected_gbitops"] == b["metrics"]["expected_gbitops"]
    assert read_json(reference / "policy.json")["layers"] == read_json(run_dir / "policy.json")["layers"]
    _assert_same_weights(reference, run_dir)
