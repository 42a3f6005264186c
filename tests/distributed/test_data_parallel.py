"""`finetune` on 2 DeepSpeed processes (gloo) equals 1 process on the same global batches.

The reference is one process with 2 gradient-accumulation steps: it sees the same micro-batches
(batch-norm statistics are per micro-batch in both) and averages the same gradients. Both sides
run one torch thread per process, so the arithmetic is the same operation for operation.

The runs are slow (`make test-all`: several processes per run); the two configurations refused
before any process starts are checked in the fast tier, through the command's `main` in-process.
"""

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from framework.paths import REPO_ROOT
from tests.conftest import (
    MPQ,
    assert_close_parameters,
    checkpoint_step,
    read_json,
    run_mpq,
    run_mpq_in_process,
    trained_parameters,
)

STEPS = 4
FINETUNE = ["finetune", "policy=uniform:4/4", "data.fraction=0.05", "data.augment=false", "data.test_fraction=0.05",
            f"finetune.max_steps={STEPS}", "finetune.batch_size=64", "tracking.enabled=false", "threads=1"]


def _finetune(run_dir: Path, init: str, *extra: str):
    proc = run_mpq(*FINETUNE, f"init_checkpoint={init}", f"hydra.run.dir={run_dir}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_json(run_dir / "result.json")


@pytest.fixture(scope="module")
def init_checkpoint(pretrained_run) -> str:
    return pretrained_run["result"]["artifacts"]["checkpoint"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, init_checkpoint):
    run_dir = tmp_path_factory.mktemp("one_process")
    result = _finetune(run_dir, init_checkpoint, "dist.gradient_accumulation=2")
    assert result["world_size"] == 1 and result["distributed"]["micro_batch"] == 32
    return run_dir


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_two_processes_equal_one_process_on_the_same_global_batches(tmp_path, init_checkpoint, one_process, zero_stage):
    result = _finetune(tmp_path, init_checkpoint, "dist.nproc=2", f"dist.zero_stage={zero_stage}")
    assert result["status"] == "ok" and result["metrics"]["steps"] == STEPS
    assert result["world_size"] == 2
    assert result["distributed"] == {"world_size": 2, "micro_batch": 32, "gradient_accumulation": 1, "global_batch": 64,
                                     "zero_stage": zero_stage, "engine": "deepspeed"}
    assert_close_parameters(tmp_path, one_process)
    # the comparison can fail: training moved the weights far beyond the tolerance
    start = torch.load(Path(init_checkpoint) / "model.pt", weights_only=True)
    moved = max((w - start[k]).abs().max().item() for k, w in trained_parameters(tmp_path).items() if k in start)
    assert moved > 1e-3
    # rank 0 alone wrote the result; every rank wrote its part of the engine's checkpoint
    engine_files = {p.name for p in (tmp_path / "checkpoints" / "last" / "deepspeed").iterdir()}
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= engine_files
    if zero_stage > 0:
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= engine_files


@pytest.mark.slow
@pytest.mark.distributed
def test_asga_two_processes_equal_one_process(tmp_path_factory, init_checkpoint):
    """The two-pass step under data parallelism: local first pass, averaged update (ZeRO 2)."""
    one, two = tmp_path_factory.mktemp("asga_one"), tmp_path_factory.mktemp("asga_two")
    sharp = ["finetune.sharpness.name=asga", "finetune.sharpness.rho=0.1"]
    _finetune(one, init_checkpoint, "dist.gradient_accumulation=2", *sharp)
    _finetune(two, init_checkpoint, "dist.nproc=2", "dist.zero_stage=2", *sharp)
    assert_close_parameters(one, two)
    radius = [torch.load(d / "checkpoints" / "last" / "training.pt", weights_only=True)["two_pass"]["rule"]["rho"]
              for d in (one, two)]
    assert radius[0] == radius[1] != 0.1  # the same adaptive radius, and it did adapt


def test_zero_stage_3_is_refused_for_two_pass_training(tmp_path, init_checkpoint):
    proc = run_mpq_in_process(*FINETUNE, f"init_checkpoint={init_checkpoint}", f"hydra.run.dir={tmp_path}",
                              "dist.zero_stage=3", "finetune.sharpness.name=sam", "dist.nproc=2")
    assert proc.returncode == 2
    assert len(proc.error_lines) == 1 and "dist.zero_stage=3" in proc.stderr and "two-pass" in proc.stderr
    assert "starting 2 processes" not in proc.stderr  # refused before any process started


def test_a_global_batch_that_does_not_split_is_one_clear_error(tmp_path, init_checkpoint):
    proc = run_mpq_in_process(*FINETUNE, f"init_checkpoint={init_checkpoint}", f"hydra.run.dir={tmp_path}",
                              "dist.gradient_accumulation=3")
    assert proc.returncode == 2 and len(proc.error_lines) == 1
    assert "finetune.batch_size=64" in proc.stderr and "multiple of 3" in proc.stderr


def _thirty_steps(init_checkpoint: str) -> list[str]:
    """ZeRO 1 on 2 processes for 30 steps: long enough to stop it after its step-4 checkpoint."""
    return [*(a for a in FINETUNE if not a.startswith("finetune.max_steps")), "finetune.max_steps=30",
            "dist.nproc=2", "dist.zero_stage=1", f"init_checkpoint={init_checkpoint}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, init_checkpoint) -> Path:
    """The 30-step run the interrupted ones must end equal to."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    done = run_mpq(*_thirty_steps(init_checkpoint), f"hydra.run.dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    return reference


def _start_and_wait_for_step_4(args: list[str], run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([MPQ, *args, f"hydra.run.dir={run_dir}", "checkpoint_every=4"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while checkpoint_step(run_dir) < 4:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def _resume_to_the_uninterrupted_weights(args: list[str], run_dir: Path, step: int, uninterrupted: Path) -> None:
    resumed = run_mpq(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in (run_dir / "finetune.log").read_text()
    assert read_json(run_dir / "result.json")["metrics"]["steps"] == 30
    assert_close_parameters(run_dir, uninterrupted)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.faults
def test_sigterm_to_two_processes_checkpoints_and_resumes_to_the_same_weights(tmp_path, init_checkpoint, uninterrupted):
    """ZeRO 1: each rank's optimizer partition is saved on SIGTERM and restored on resume."""
    args = _thirty_steps(init_checkpoint)
    proc = _start_and_wait_for_step_4(args, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    interrupted = read_json(tmp_path / "result.json")
    assert interrupted["status"] == "interrupted" and 4 <= interrupted["step"] < 30, (interrupted, stderr[-3000:])
    _resume_to_the_uninterrupted_weights(args, tmp_path, interrupted["step"], uninterrupted)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.faults
def test_sigkill_of_one_rank_ends_the_run_promptly_with_one_error_and_resumes(tmp_path, init_checkpoint, uninterrupted):
    """Rank 1 killed (as the OOM killer or a lost node would): rank 0's next collective fails, it
    says so in one line, the launcher ends with status 2 within seconds (not at the process
    group's timeout), the last checkpoint is intact, and resume=true ends on the uninterrupted weights."""
    args = _thirty_steps(init_checkpoint)
    proc = _start_and_wait_for_step_4(args, tmp_path)
    workers = [child for child in psutil.Process(proc.pid).children(recursive=True)
               if child.environ().get("RANK") is not None]
    (rank1,) = [w for w in workers if w.environ()["RANK"] == "1"]
    killed = time.time()
    rank1.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - killed < 60, "the launcher took as long as a timeout to notice"
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mpq finetune: error: another process of this 2-process run died"), errors
    step = checkpoint_step(tmp_path)
    assert 4 <= step < 30 and f"the last checkpoint {tmp_path / 'checkpoints' / 'last'} (step {step}) is intact" in errors[0]
    assert "resume=true" in errors[0]
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "error" and result["error"] in errors[0]
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # no rank left behind
    _resume_to_the_uninterrupted_weights(args, tmp_path, step, uninterrupted)
