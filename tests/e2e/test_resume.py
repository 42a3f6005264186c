"""A killed run resumes where it was: same steps, same data order, same final weights."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    assert_same_weights,
    checkpoint_step,
    policy_layers,
    read_result,
    run_stage,
    start_mpq,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # runs killed and resumed: `make test-all`

ARGS = ["data.fraction=0.05", "data.test_fraction=0.05", "train.epochs=3", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_stage("pretrain", run_dir, *ARGS)
    return run_dir


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, uninterrupted):
    proc = start_mpq("pretrain", *ARGS, f"hydra.run.dir={tmp_path}", "checkpoint_every=5")
    wait_for(lambda: checkpoint_step(tmp_path) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint_step(tmp_path)
    reference = read_result(uninterrupted)
    assert 5 <= killed_at < reference["metrics"]["steps"]

    result = run_stage("pretrain", tmp_path, *ARGS, "checkpoint_every=5", "resume=true")
    assert f"resuming at step {killed_at}" in (tmp_path / "pretrain.log").read_text()
    assert result["metrics"]["steps"] == reference["metrics"]["steps"]
    assert result["metrics"]["top1"] == reference["metrics"]["top1"]
    assert_same_weights(tmp_path, uninterrupted)


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (Linux: bit 15 of SigCgt in its status)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # it ended: wait_for reports that with its stderr
        return False
    caught = next((int(line.split()[1], 16) for line in lines if line.startswith("SigCgt:")), 0)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path, uninterrupted):
    proc = start_mpq("pretrain", *ARGS, f"hydra.run.dir={tmp_path}")  # no periodic checkpoints: only the signal can write one mid-epoch
    # the training loop holds the handler; before it (data, engine) a SIGTERM ends the process plainly, and on
    # a loaded machine that set-up outlasted a fixed second after the stage's first log line
    wait_for(lambda: _catches_sigterm(proc.pid), proc)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "resume=true" in stderr
    result = read_result(tmp_path)
    assert result["status"] == "interrupted"
    state = torch.load(tmp_path / "checkpoints" / "last" / "training.pt", weights_only=True)
    assert state["position"]["step"] == result["step"] > 0

    run_stage("pretrain", tmp_path, *ARGS, "resume=true")
    assert_same_weights(tmp_path, uninterrupted)


def test_asga_search_resumes_with_its_radius_and_gives_the_same_policy(tmp_path, pretrained_checkpoint):
    args = ["search=seam_asga", f"init_checkpoint={pretrained_checkpoint}", "proxy.per_class=30", "proxy.test_fraction=0.05",
            "search.batch_size=30", "search.epochs=2", "tracking.enabled=false", "checkpoint_every=3"]
    reference = tmp_path / "reference"
    a = run_stage("search", reference, *args)

    run_dir = tmp_path / "killed"
    killed = start_mpq("search", *args, f"hydra.run.dir={run_dir}")
    wait_for(lambda: checkpoint_step(run_dir) >= 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert 3 <= checkpoint_step(run_dir) < a["metrics"]["steps"] == 20
    b = run_stage("search", run_dir, *args, "resume=true")

    assert a["metrics"]["rho"] == b["metrics"]["rho"]
    assert a["metrics"]["expected_gbitops"] == b["metrics"]["expected_gbitops"]
    assert policy_layers(reference / "policy.json") == policy_layers(run_dir / "policy.json")
    assert_same_weights(reference, run_dir)
