"""A development Slurm cluster for the launcher tests, up for the module, down afterwards."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from framework.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "slurm" / "dev-cluster"


@pytest.fixture(scope="module")
def slurm_cluster():
    """Environment variables (SLURM_CONF, ...) of a running single-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("the development cluster starts daemons as root")
    base = Path(tempfile.mkdtemp(prefix="mpq-dev-cluster-", dir="/tmp"))
    base.chmod(0o755)
    env = {**os.environ, "MPQ_SLURM_STATE": str(base / "state")}
    up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"MPQ_SLURM_STATE": str(base / "state"), "SLURM_CONF": str(base / "state" / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
