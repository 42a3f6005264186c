"""A sweep that joins a running Ray cluster: `tune.address=auto` against a head started by
`ray start` on 127.0.0.1, and slurm/ray_sweep.sbatch on the development Slurm cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from framework.paths import REPO_ROOT
from tests.conftest import end_process_group, free_port, port_answers, read_json, wait_for
from tests.slurm.conftest import slurm_cluster  # noqa: F401  (the development cluster, as a fixture here too)
from tests.tune.conftest import TINY_TRIAL

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a Ray cluster of its own (and Slurm): `make test-all`

CLUSTER_SWEEP = ["~tune.space", "+tune.space={seed: {range: [0, 2]}}", "search.epochs=1", "tune.scheduler.name=fifo",
                 "tracking.enabled=false"]


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1 in its own process group, ended (the group only) afterwards."""
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # as slurm/ray_sweep.sbatch runs it
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_answers(port), proc, timeout=60, what="the Ray head")
        yield f"127.0.0.1:{port}"
    finally:
        end_process_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_tune_address_auto_joins_the_running_cluster(tmp_path, pretrained_checkpoint, ray_head):
    """The sweep in its own process, as `mpq sweep tune.address=auto` on a cluster node runs it."""
    checkpoint = pretrained_checkpoint
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-m", "tests.tune.sweep_main", str(tmp_path), checkpoint, *CLUSTER_SWEEP,
                           "tune.address=auto"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_json(tmp_path / "result.json")
    assert result["ray"]["mode"] == "cluster" and result["metrics"]["finished"] == 2
    # the sweep leaves the cluster running
    socket.create_connection(("127.0.0.1", int(ray_head.rsplit(":", 1)[1])), timeout=2).close()


@pytest.mark.slurm
def test_the_sbatch_template_starts_ray_on_the_allocation_and_sweeps(request, tmp_path):
    cluster_env = request.getfixturevalue("slurm_cluster")  # brought up only when the test can run
    checkpoint = request.getfixturevalue("pretrained_checkpoint")
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")
    env = {**os.environ, **cluster_env, "MPQ_PYTHON": sys.executable, "MPQ_RUN_DIR": str(tmp_path / "sweep"),
           "MPQ_RAY_PORT": str(free_port()), "MPQ_RAY_TMP": ray_tmp}
    overrides = [o for o in TINY_TRIAL if not o.startswith("tune.max_concurrent")]
    done = subprocess.run(["sbatch", "--wait", "--time=10", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
                           "slurm/ray_sweep.sbatch", f"init_checkpoint={checkpoint}", *overrides, *CLUSTER_SWEEP],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr + log[-4000:]
    assert "Ray cluster up: 2 CPUs" in log
    result = read_json(tmp_path / "sweep" / "result.json")
    assert result["status"] == "ok" and result["metrics"]["finished"] == 2 and result["ray"]["mode"] == "cluster"


@pytest.mark.slurm
def test_the_sbatch_template_runs_the_whole_pipeline_on_the_ray_cluster_it_starts(request, tmp_path):
    """MPQ_STAGE=pipeline: the sweep through Ray Tune and each stage through Ray Train, on the
    allocation's Ray cluster (`launcher=ray launcher.address=auto`)."""
    cluster_env = request.getfixturevalue("slurm_cluster")
    ray_tmp = tempfile.mkdtemp(prefix="rayp", dir="/tmp")
    env = {**os.environ, **cluster_env, "MPQ_PYTHON": sys.executable, "MPQ_RUN_DIR": str(tmp_path / "pipeline"),
           "MPQ_RAY_PORT": str(free_port()), "MPQ_RAY_TMP": ray_tmp, "MPQ_STAGE": "pipeline"}
    overrides = ["experiment=smoke", "pipeline.export=false", "pipeline.baseline=false",
                 "tune.cpus_per_trial=1", *CLUSTER_SWEEP]
    done = subprocess.run(["sbatch", "--wait", "--time=20", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
                           "slurm/ray_sweep.sbatch", *overrides],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr + log[-4000:]
    assert "mpq pipeline: Ray head" in log and "Ray cluster up: 2 CPUs" in log
    result = read_json(tmp_path / "pipeline" / "result.json")
    assert result["status"] == "ok" and [s["stage"] for s in result["stages"]] == ["pretrain", "sweep", "finetune", "evaluate"]
    assert read_json(tmp_path / "pipeline" / "sweep" / "result.json")["metrics"]["finished"] == 2
    for stage in ("pretrain", "finetune", "evaluate"):
        assert read_json(tmp_path / "pipeline" / stage / "result.json")["ray"]["mode"] == "cluster", stage
