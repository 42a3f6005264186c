"""`launcher=ray`: stages as Ray Train TorchTrainers on a real two-node Ray cluster on 127.0.0.1.

The cluster: a head and a second node (`ray start --address`), one CPU each, started inside the
test's namespace. The second node runs in its own mount namespace where one folder of the test's
temporary directory is hidden behind an empty tmpfs, so it stands for a node that does not see a
run directory outside the shared storage. A Ray cluster and Ray Train workers: every test is slow
(`make test-all`); the restart and the stop-and-resume are fault tests too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from framework.paths import REPO_ROOT
from tests.conftest import (
    MPQ,
    assert_close_parameters,
    checkpoint_step,
    end_process_group,
    free_port,
    port_answers,
    read_json,
    run_mpq,
    trained_parameters,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.distributed]

STEPS = 4
FINETUNE = ["finetune", "policy=uniform:4/4", "data.fraction=0.05", "data.augment=false", "data.test_fraction=0.05",
            "finetune.batch_size=64", "tracking.enabled=false", "threads=1"]
RAY = ["launcher=ray", "launcher.workers_per_node=1", "dist.nproc=2"]


def _start_node(args: list[str], env: dict[str, str], hide: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", "--disable-usage-stats", *args]
    if hide is not None:  # a private mount namespace in which `hide` is an empty tmpfs
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs mpq-hidden "{hide}" && exec "$@"', "node", *command]
    return subprocess.Popen(command, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    probe = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a second node on 127.0.0.1, one CPU each; `hidden` is a folder the second node
    cannot see (None where no mount namespace can be made: the second node then sees everything)."""
    base = tmp_path_factory.mktemp("ray_cluster")
    hidden: Path | None = base / "hidden"
    hidden.mkdir()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        hidden = None
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    procs = [_start_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"], env)]
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: port_answers(port), procs[0], timeout=90, what="the Ray head")
        procs.append(_start_node([f"--address={address}"], env, hide=hidden))
        wait_for(lambda: _alive_nodes(address, env) >= 2, procs[1], timeout=90, what="the second Ray node")
        yield {"address": address, "env": env, "hidden": hidden, "port": port}
    finally:
        for proc in reversed(procs):
            end_process_group(proc, term_wait=20)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def init_checkpoint(pretrained_run) -> str:
    return pretrained_run["result"]["artifacts"]["checkpoint"]


def _run(cluster, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**cluster["env"]}
    return subprocess.run([MPQ, *args, f"launcher.address={cluster['address']}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_finetune_on_two_ray_nodes_equals_the_local_launcher(tmp_path, ray_cluster, init_checkpoint):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    base = [*FINETUNE, f"finetune.max_steps={STEPS}", f"init_checkpoint={init_checkpoint}"]
    done = run_mpq(*base, "dist.nproc=2", f"hydra.run.dir={local}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(ray_cluster, *base, *RAY, f"hydra.run.dir={on_ray}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_json(on_ray / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == STEPS and result["world_size"] == 2
    assert result["distributed"]["engine"] == "deepspeed" and result["distributed"]["global_batch"] == 64
    workers = result["ray"]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, workers  # one worker on each node
    assert result["ray"]["mode"] == "cluster" and result["ray"]["restarts"] == 0
    assert_close_parameters(local, on_ray)
    start = torch.load(Path(init_checkpoint) / "model.pt", weights_only=True)
    assert max((w - start[k]).abs().max().item() for k, w in trained_parameters(on_ray).items() if k in start) > 1e-3
    assert "finetune resnet8" in (on_ray / "finetune.log").read_text()  # rank 0's log in the run directory
    # the cluster is left running
    socket.create_connection(("127.0.0.1", ray_cluster["port"]), timeout=2).close()


def _thirty_steps(init_checkpoint: str) -> list[str]:
    """ZeRO 1 on 2 processes for 30 steps: long enough to stop it after its step-4 checkpoint."""
    return [*FINETUNE, "finetune.max_steps=30", "dist.zero_stage=1", f"init_checkpoint={init_checkpoint}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, init_checkpoint) -> Path:
    """The 30-step run, on 2 local processes, that the stopped runs must end equal to."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    done = run_mpq(*_thirty_steps(init_checkpoint), "dist.nproc=2", f"hydra.run.dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    return reference


def _start_on_ray_and_wait_for_step_4(cluster, init_checkpoint: str, run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([MPQ, *_thirty_steps(init_checkpoint), *RAY, f"launcher.address={cluster['address']}",
                             "checkpoint_every=4", f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT, env=cluster["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: checkpoint_step(run_dir) >= 4, proc, timeout=300, what="the step-4 checkpoint of the run on Ray")
    return proc


@pytest.mark.faults
def test_a_killed_worker_is_restarted_and_the_run_resumes_to_the_uninterrupted_weights(tmp_path, ray_cluster,
                                                                                      init_checkpoint, uninterrupted):
    """SIGKILL to rank 1 after the step-4 checkpoint: Ray Train starts the worker group again, which
    resumes from checkpoints/last and ends with the weights of a run nobody stopped."""
    run_dir = tmp_path / "killed"
    proc = _start_on_ray_and_wait_for_step_4(ray_cluster, init_checkpoint, run_dir)
    first = [json.loads(line) for line in (run_dir / "ray" / "workers.jsonl").read_text().splitlines()][-1]
    (rank1,) = [w["pid"] for w in first["workers"] if w["rank"] == 1]
    os.kill(rank1, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == 30
    assert result["ray"]["restarts"] == 1 and rank1 not in {w["pid"] for w in result["ray"]["workers"]}
    assert 4 <= result["resume"]["step"] < 30 and result["resume"]["from"] == str(run_dir / "checkpoints" / "last")
    assert f"resuming at step {result['resume']['step']}" in (run_dir / "finetune.log").read_text()
    assert_close_parameters(run_dir, uninterrupted)


@pytest.mark.faults
def test_sigterm_to_the_driver_checkpoints_and_resume_true_continues(tmp_path, ray_cluster, init_checkpoint,
                                                                      uninterrupted):
    """A stopped job: the workers save checkpoints/last and stop, the run ends `interrupted` (143),
    and `resume=true` in the same run directory ends with the uninterrupted weights."""
    run_dir = tmp_path / "stopped"
    proc = _start_on_ray_and_wait_for_step_4(ray_cluster, init_checkpoint, run_dir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = read_json(run_dir / "result.json")
    assert stopped["status"] == "interrupted" and 4 <= stopped["step"] < 30, stderr[-3000:]
    assert "resume=true" in stopped["error"] and "Traceback" not in stderr
    done = _run(ray_cluster, *_thirty_steps(init_checkpoint), *RAY, f"hydra.run.dir={run_dir}", "resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == 30 and result["resume"]["step"] == stopped["step"]
    assert_close_parameters(run_dir, uninterrupted)


def test_a_run_directory_a_node_cannot_see_is_one_clear_error(ray_cluster, init_checkpoint):
    if ray_cluster["hidden"] is None:
        pytest.skip("needs unshare -m (a mount namespace) to hide a folder from the second node")
    run_dir = ray_cluster["hidden"] / "run"  # the second node sees an empty tmpfs there
    done = _run(ray_cluster, *FINETUNE, f"finetune.max_steps={STEPS}", f"init_checkpoint={init_checkpoint}", *RAY,
                f"hydra.run.dir={run_dir}", timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("mpq finetune: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "cannot read" in errors[0] and str(run_dir) in errors[0] and "storage every node" in errors[0]
    assert "starting 2 Ray Train worker" not in done.stderr  # refused before any worker started
    assert read_json(run_dir / "result.json")["status"] == "error"


def test_the_pipeline_sweeps_and_finetunes_on_the_cluster_and_leaves_it_running(tmp_path, ray_cluster):
    run_dir = tmp_path / "pipeline"
    done = _run(ray_cluster, "pipeline", "experiment=smoke", "launcher=ray", "pipeline.sweep=true", "pipeline.export=false",
                "pipeline.baseline=false", "~tune.space", "+tune.space={seed: {range: [0, 2]}}", "tune.scheduler.name=fifo",
                "tune.cpus_per_trial=1", "tracking.enabled=false",
                f"hydra.run.dir={run_dir}", timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and [s["stage"] for s in result["stages"]] == ["pretrain", "sweep", "finetune", "evaluate"]
    sweep = read_json(run_dir / "sweep" / "result.json")
    assert sweep["metrics"]["trials"] == 2 and sweep["metrics"]["finished"] == 2 and sweep["ray"]["mode"] == "existing"
    for stage in ("pretrain", "finetune", "evaluate"):
        assert read_json(run_dir / stage / "result.json")["ray"]["mode"] == "cluster", stage
    assert result["metrics"]["top1"] > 0.1  # better than chance on 10 classes
    socket.create_connection(("127.0.0.1", ray_cluster["port"]), timeout=2).close()
    assert _alive_nodes(ray_cluster["address"], ray_cluster["env"]) == 2
