"""The sbatch templates in slurm/ run for real on the development cluster."""

import os
import subprocess
import sys

import pytest

from framework.paths import REPO_ROOT
from tests.conftest import read_json

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # the development cluster's daemons: `make test-all`


def _sbatch_wait(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`sbatch --wait ...`: returns when the job (every array task) has ended."""
    return subprocess.run(["sbatch", "--wait", "--time=10", *args], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
def test_multinode_finetune_template_on_one_node_with_two_processes(slurm_cluster, tmp_path, pretrained_run):
    env = {**slurm_cluster, "MPQ_PYTHON": sys.executable, "MPQ_NPROC_PER_NODE": "2", "MPQ_RUN_DIR": str(tmp_path / "run")}
    done = _sbatch_wait(env, "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
                        "slurm/finetune_multinode.sbatch",
                        f"init_checkpoint={pretrained_run['result']['artifacts']['checkpoint']}", "policy=uniform:4/4",
                        "data.fraction=0.05", "data.test_fraction=0.05", "finetune.max_steps=4", "tracking.enabled=false")
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert "1 node(s) x 2 process(es)" in log
    result = read_json(tmp_path / "run" / "result.json")
    assert result["status"] == "ok" and result["world_size"] == 2 and result["metrics"]["steps"] == 4


def test_search_array_template_runs_one_search_per_seed(slurm_cluster, tmp_path, pretrained_run):
    env = {**slurm_cluster, "MPQ_PYTHON": sys.executable, "MPQ_SEEDS": "0 1", "MPQ_RUN_ROOT": str(tmp_path)}
    done = _sbatch_wait(env, "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out",
                        "slurm/search_array.sbatch",
                        f"init_checkpoint={pretrained_run['result']['artifacts']['checkpoint']}", "search=dnas",
                        "proxy.per_class=20", "proxy.test_fraction=0.02", "search.batch_size=40", "search.max_steps=3",
                        "tracking.enabled=false")
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    results = {seed: read_json(tmp_path / f"seed{seed}" / "result.json") for seed in (0, 1)}
    assert all(r["status"] == "ok" for r in results.values())
    assert [results[s]["config"]["seed"] for s in (0, 1)] == [0, 1]
    assert all((tmp_path / f"seed{s}" / "policy.json").exists() for s in (0, 1))
