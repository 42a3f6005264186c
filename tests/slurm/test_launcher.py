"""`launcher=slurm` on the development cluster: a stage runs as a job, a requeued job resumes from
its checkpoint, and a cancelled job is reported as such."""

import os
import subprocess
import time

import pytest

from framework.paths import REPO_ROOT
from tests.conftest import MPQ, checkpoint_step, read_json, run_mpq

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # the development cluster's daemons: `make test-all`


def _start(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    """Start `mpq ... launcher=slurm` and return it with the id of the job it submitted."""
    proc = subprocess.Popen([MPQ, *args, "launcher=slurm", "launcher.poll_seconds=0.5", "tracking.enabled=false"],
                            cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "submitted Slurm job" in line, line + proc.stderr.read()[-2000:]
    return proc, line.split("Slurm job ")[1].split()[0]


def _scontrol(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)


def test_a_stage_runs_as_a_slurm_job(slurm_cluster, tmp_path):
    proc = run_mpq("pretrain", "experiment=smoke", "launcher=slurm", "launcher.poll_seconds=0.5",
                   f"hydra.run.dir={tmp_path}", "tracking.enabled=false", env=slurm_cluster, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "submitted Slurm job" in proc.stdout
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == 20
    assert result["config"]["launcher"]["name"] == "local"  # what ran inside the job


@pytest.mark.faults
def test_a_requeued_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    proc, job = _start(slurm_cluster, "pretrain", "data.fraction=0.05", "data.test_fraction=0.05", "train.epochs=3",
                       "checkpoint_every=5", f"hydra.run.dir={tmp_path}")
    deadline = time.time() + 180
    while checkpoint_step(tmp_path) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    assert _scontrol(slurm_cluster, "requeue", job).returncode == 0
    # a requeued job waits for a begin time (minutes): once it is pending again, let it start at once
    requeued = False
    while True:
        info = _scontrol(slurm_cluster, "show", "job", job).stdout
        requeued = requeued or any(f"JobState={s}" in info for s in ("PENDING", "REQUEUED", "COMPLETING"))
        if "Reason=BeginTime" in info:
            _scontrol(slurm_cluster, "update", f"jobid={job}", "StartTime=now")
        if (requeued and "JobState=RUNNING" in info) or "JobState=COMPLETED" in info:
            break
        assert time.time() < deadline, info
        time.sleep(0.3)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    log = (tmp_path / "pretrain.log").read_text()
    assert "stopped by SIGTERM" in (tmp_path / "slurm" / f"{job}_0_log.err").read_text()
    resumed_at = int(log.split("resuming at step ")[1].split()[0])
    assert resumed_at >= 5
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == 3 * (2700 // 128)  # 5% of the 54,000 not held out


def test_a_cancelled_job_is_reported_not_waited_on(slurm_cluster, tmp_path):
    proc, job = _start(slurm_cluster, "pretrain", "data.fraction=0.05", "train.epochs=50", f"hydra.run.dir={tmp_path}")
    subprocess.run(["scancel", job], env={**os.environ, **slurm_cluster}, check=True, timeout=30)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"Slurm job {job} was cancelled" in stderr
    assert read_json(tmp_path / "result.json")["status"] == "error"


@pytest.mark.distributed
def test_a_two_task_finetune_job_completes(slurm_cluster, tmp_path, pretrained_run):
    """`dist.nproc=2` under `launcher=slurm`: 2 Slurm tasks, each one DeepSpeed rank (gloo)."""
    proc = run_mpq("finetune", f"init_checkpoint={pretrained_run['result']['artifacts']['checkpoint']}",
                   "policy=uniform:4/4", "data.fraction=0.05", "data.test_fraction=0.05", "finetune.max_steps=6",
                   "dist.nproc=2", "dist.zero_stage=2", "launcher=slurm", "launcher.cpus_per_task=1",
                   "launcher.poll_seconds=0.5", f"hydra.run.dir={tmp_path}", "tracking.enabled=false",
                   env=slurm_cluster, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = proc.stdout.split("submitted Slurm job ")[1].split()[0]
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "ok" and result["metrics"]["steps"] == 6
    assert result["world_size"] == 2 and result["distributed"]["zero_stage"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in (tmp_path / "checkpoints" / "last" / "deepspeed").iterdir()}
    # both tasks ran in the job (submitit writes one log per task)
    assert {f"{job}_0_log.out", f"{job}_1_log.out"} <= {p.name for p in (tmp_path / "slurm").iterdir()}


def test_multirun_sends_each_sweep_point_as_a_slurm_job(slurm_cluster, tmp_path, pretrained_run):
    """`--multirun launcher=slurm`: Hydra's submitit launcher, one job per point, all waited for."""
    proc = run_mpq("search", "--multirun", "seed=0,1", "search=dnas",
                   f"init_checkpoint={pretrained_run['result']['artifacts']['checkpoint']}", "proxy.per_class=20",
                   "proxy.test_fraction=0.02", "search.batch_size=40", "search.max_steps=3", "launcher=slurm",
                   "launcher.cpus_per_task=1", "launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}",
                   "tracking.enabled=false", env=slurm_cluster, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [read_json(tmp_path / str(i) / "result.json") for i in (0, 1)]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["config"]["seed"] for r in results] == [0, 1]
    assert all(r["config"]["resume"] for r in results)  # a requeued point would continue from its checkpoint
    assert len(list((tmp_path / ".submitit").iterdir())) >= 2  # the jobs Hydra's launcher submitted


@pytest.mark.study
def test_a_study_runs_one_slurm_job_per_row_and_seed(slurm_cluster, tmp_path, pretrained_checkpoint):
    proc = run_mpq("study", "study=smoke", "study.seeds=[0]", f"study.init_checkpoint={pretrained_checkpoint}",
                   "launcher=slurm", "launcher.poll_seconds=0.5", "tracking.enabled=false", f"hydra.run.dir={tmp_path}",
                   env=slurm_cluster, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = ("uniform-budget", "random", "asga-mnist")
    assert proc.stdout.count("submitted Slurm job") == len(rows)
    for row in rows:
        job = read_json(tmp_path / "slurm" / row / "seed0" / "result.json")  # what ran inside the job
        assert job["status"] == "ok" and job["config"]["launcher"]["name"] == "local"
        assert job["config"]["study"]["only"] == f"{row}/0"
        assert (tmp_path / "runs" / row / "seed0" / "run.json").is_file()
    report = read_json(tmp_path / "study.json")
    assert [row["name"] for row in report["rows"]] == list(rows) and all(row["n"] == 1 for row in report["rows"])
