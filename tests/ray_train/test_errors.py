"""`launcher=ray` refuses what cannot work in one line, before any Ray worker starts. What is refused
before Ray starts is checked through the command's `main` in-process (fast); the CPU count of a Ray
it starts is slow (`make test-all`)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port, read_json, run_mpq, run_mpq_in_process

FINETUNE = ["finetune", "policy=uniform:4/4", "data.fraction=0.05", "tracking.enabled=false", "launcher=ray", "dist.nproc=2"]


def _one_error(proc, stage: str = "finetune") -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"mpq {stage}: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Ray Train worker" not in proc.stderr
    return errors[0]


def test_an_unreachable_address_is_one_error_within_seconds(tmp_path):
    port = free_port()  # nothing listens there
    started = time.time()
    proc = run_mpq_in_process(*FINETUNE, f"launcher.address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path}")
    error = _one_error(proc)
    assert f"launcher.address=127.0.0.1:{port}: cannot reach a Ray cluster" in error and "ray start --head" in error
    assert time.time() - started < 60
    assert read_json(tmp_path / "result.json")["status"] == "error"


def test_zero_stage_3_is_refused(tmp_path):
    proc = run_mpq_in_process(*FINETUNE, "dist.zero_stage=3", "finetune.sharpness.name=sam", f"hydra.run.dir={tmp_path}")
    error = _one_error(proc)
    assert "dist.zero_stage=3" in error and "two-pass" in error
    pipeline = run_mpq_in_process("pipeline", "launcher=ray", "dist.zero_stage=3", f"hydra.run.dir={tmp_path / 'pipeline'}")
    assert "dist.zero_stage=3" in _one_error(pipeline, "pipeline")


def test_workers_per_node_that_ray_cannot_hold_is_refused(tmp_path):
    proc = run_mpq_in_process(*FINETUNE[:-1], "dist.nproc=4", "launcher.workers_per_node=2", f"hydra.run.dir={tmp_path}")
    error = _one_error(proc)
    assert "launcher.workers_per_node=2" in error and "STRICT_SPREAD" in error


@pytest.mark.slow  # starts a Ray of 2 CPUs in a new process
@pytest.mark.ray
def test_more_workers_than_the_cluster_has_cpus_is_refused(tmp_path):
    proc = run_mpq(*FINETUNE[:-1], "dist.nproc=3", "launcher.num_cpus=2", f"hydra.run.dir={tmp_path}")
    error = _one_error(proc)
    assert "3 workers need 3 CPUs" in error and "the cluster has 2 CPUs" in error
