"""The development Slurm cluster comes up for real, runs and cancels jobs, and goes down cleanly."""

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from framework.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "slurm" / "dev-cluster"
pytestmark = [pytest.mark.slow, pytest.mark.slurm,
              pytest.mark.skipif(os.geteuid() != 0, reason="the development cluster starts daemons as root")]


def _sh(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)


def _state(name: str, env: dict) -> str:
    """The accounting state of the job named `name` (names are unique per test run: job ids restart
    with a new state folder while the accounting database keeps earlier runs' records)."""
    out = _sh("sacct", "-X", "-n", "-P", "--name", name, "-o", "State", env=env).stdout.strip()
    return out.splitlines()[-1] if out else ""


def _wait_state(job: str, prefix: str, env: dict, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = _state(job, env)
        if state.startswith(prefix):
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job} never reached {prefix}: last state {state!r}")


@pytest.fixture
def state_dir():
    """A state folder the slurm user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mpq-dev-cluster-", dir="/tmp"))
    path.chmod(0o755)
    yield path / "state"
    shutil.rmtree(path, ignore_errors=True)


def test_cluster_runs_completes_and_cancels_jobs(tmp_path, state_dir):
    env = {**os.environ, "MPQ_SLURM_STATE": str(state_dir)}
    up = _sh("bash", str(SCRIPTS / "up.sh"), env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
        assert Path(env["SLURM_CONF"]).exists()
        again = _sh("bash", str(SCRIPTS / "up.sh"), env=env)
        assert again.returncode == 0 and "already running" in again.stdout + again.stderr

        assert "idle" in _sh("sinfo", "-h", "-o", "%T", env=env).stdout
        tag = uuid.uuid4().hex[:8]
        done = _sh("sbatch", "--parsable", f"--job-name=done-{tag}", f"--output={tmp_path}/done.out",
                   "--wrap", "echo rank-$SLURM_PROCID", env=env)
        assert done.returncode == 0, done.stderr
        assert _wait_state(f"done-{tag}", "COMPLETED", env) == "COMPLETED"
        assert (tmp_path / "done.out").read_text().strip() == "rank-0"

        ranks = _sh("srun", "-n2", "bash", "-c", "echo $SLURM_PROCID", env=env)
        assert sorted(ranks.stdout.split()) == ["0", "1"], ranks.stderr

        long = _sh("sbatch", "--parsable", f"--job-name=long-{tag}", "--output=/dev/null", "--wrap", "sleep 300", env=env)
        job = long.stdout.strip().split(";")[0]
        _wait_state(f"long-{tag}", "RUNNING", env)
        _sh("scancel", job, env=env)
        assert _wait_state(f"long-{tag}", "CANCELLED", env).startswith("CANCELLED")
    finally:
        down = _sh("bash", str(SCRIPTS / "down.sh"), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _sh("pgrep", "-x", "slurmctld", env=env).returncode == 1  # nothing left running
