"""Faults at the edges a cluster user meets on the first day: `resume=true` with nothing to resume,
a budget no policy can meet, and a disk that fills up while a checkpoint is written.

Each ends in one line (a warning, or `mpq <stage>: error: ...` with exit status 2) and loses
nothing that was already written. The command is called in-process (launchers.cli.main) where it
ends before training or trains two steps; the full disk, a fault injected into a subprocess, is slow."""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import subprocess
import time

import pytest

from framework.train.checkpoint import load_checkpoint
from tests.conftest import (
    MPQ,
    Completed,
    assert_one_error_line,
    compose_config,
    read_result,
    run_mpq_in_process,
    run_stage,
)

TINY = ["data=fashion_mnist", "model=resnet8", "data.fraction=0.02", "data.test_fraction=0.05", "train.epochs=1",
        "tracking.enabled=false"]


def test_resume_without_a_checkpoint_says_so_once_and_starts_from_scratch(tmp_path):
    run_dir = tmp_path / "new"
    proc = run_mpq_in_process("pretrain", *TINY, "train.max_steps=2", "resume=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "resume=true" in warnings[0] and "starting from scratch" in warnings[0]
    assert str(run_dir / "checkpoints" / "last") in warnings[0]
    result = read_result(run_dir)
    assert result["status"] == "ok" and result["metrics"]["steps"] == 2
    assert result["resume"]["requested"] and result["resume"]["from"] is None
    assert "starting from scratch" in result["resume"]["warning"]

    # the same command again finds the checkpoint: no warning, and it continues from step 2 (the end)
    again = run_mpq_in_process("pretrain", *TINY, "train.max_steps=2", "resume=true", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if "WARNING" in line]
    resumed = read_result(run_dir)
    assert resumed["resume"]["from"] == str(run_dir / "checkpoints" / "last") and resumed["resume"]["step"] == 2
    assert resumed["metrics"]["steps"] == 2


def test_an_impossible_budget_is_refused_before_the_search_trains(tmp_path, pretrained_checkpoint):
    run_dir = tmp_path / "search"
    proc = run_mpq_in_process("search", f"init_checkpoint={pretrained_checkpoint}", "search.budget_bitops=1",
                              "search.epochs=50", "tracking.enabled=false", f"hydra.run.dir={run_dir}")
    assert_one_error_line(proc, "search", "is impossible", "the cheapest policy", "search.budget_bitops",
                          run_dir=run_dir)
    assert not (run_dir / "checkpoints").exists()  # not one search step


def test_the_pipeline_refuses_an_impossible_budget_before_it_pretrains(tmp_path):
    run_dir = tmp_path / "pipeline"
    proc = run_mpq_in_process("pipeline", *TINY, "search.budget_size_mb=0.0001", f"hydra.run.dir={run_dir}")
    assert_one_error_line(proc, "pipeline", "size budget", "is impossible", "search.budget_size_mb", run_dir=run_dir)
    assert not (run_dir / "pretrain").exists()


@pytest.mark.parametrize("policy,fragments", [
    ("uniform:9/9", ("policy=uniform:9/9", "9 bits is not supported")),
    ("uniform:4", ("policy=uniform:4 is malformed",)),
    ("random:x", ("policy=random:x is malformed",)),
])
def test_the_pipeline_refuses_a_bad_fixed_policy_before_it_pretrains(tmp_path, policy, fragments):
    run_dir = tmp_path / "pipeline"
    started = time.time()
    proc = run_mpq_in_process("pipeline", *TINY, f"pipeline.policy={policy}", f"hydra.run.dir={run_dir}")
    assert_one_error_line(proc, "pipeline", *fragments, run_dir=run_dir)
    assert not (run_dir / "pretrain").exists() and time.time() - started < 60


def test_a_budget_every_policy_meets_is_one_warning_line(tmp_path):
    from framework.search.loop import check_search_budget

    cfg = compose_config("pipeline", [*TINY, "search.budget_uniform_bits=8"])  # the candidates stop at 6 bits
    with _captured_warnings() as records:
        check_search_budget(cfg)
    (line,) = [r.getMessage() for r in records if "met by every policy" in r.getMessage()]
    assert "search.budget_uniform_bits" in line
    with _captured_warnings() as records:
        check_search_budget(compose_config("pipeline", [*TINY, "search.budget_uniform_bits=2.5"]))
    assert not [r for r in records if "met by every policy" in r.getMessage()]


@contextlib.contextmanager
def _captured_warnings():
    """The warning records the search loop's logger emits inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("framework.search.loop")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.skipif(shutil.which("unshare") is None or not _can_mount_tmpfs(),
                    reason="needs `unshare -m` and a tmpfs mount (root in a user or mount namespace)")
def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one_and_is_one_error(tmp_path, pretrained_run):
    """checkpoints/ on a tmpfs of 1.5 checkpoints: `last` at step 2 fits, the next one's staging
    copy cannot; the run ends with one line and the step-2 checkpoint stays whole (and resumable)."""
    size = sum(f.stat().st_size for f in (pretrained_run["run_dir"] / "checkpoints" / "last").rglob("*") if f.is_file())
    run_dir, saved = tmp_path / "run", tmp_path / "saved"
    (run_dir / "checkpoints").mkdir(parents=True)
    saved.mkdir()
    args = [*TINY, "train.max_steps=6", "checkpoint_every=2", f"hydra.run.dir={run_dir}"]
    mpq = shlex.join([MPQ, "pretrain", *args])
    checkpoints = shlex.quote(str(run_dir / "checkpoints"))
    # the tmpfs lives as long as the namespace: copy what it holds out before the shell ends
    script = (f"mount -t tmpfs -o size={int(1.5 * size) // 1024}k mpq-full {checkpoints} || exit 99; "
              f"{mpq}; rc=$?; cp -a {checkpoints}/. {shlex.quote(str(saved))}/; exit $rc")
    raw = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    proc = Completed(raw.returncode, raw.stdout, raw.stderr)
    assert proc.returncode != 99, proc.stderr
    line = assert_one_error_line(proc, "pretrain", "cannot write checkpoint", "the disk is full",
                                 "the previous checkpoint there (step 2) is intact", "resume=true", run_dir=run_dir)
    assert str(run_dir / "checkpoints" / "last") in line

    # nothing half-written is left, and the previous checkpoint reads back whole
    assert sorted(p.name for p in saved.iterdir()) == ["last"]
    kept = load_checkpoint(saved / "last", with_training_state=True)
    assert kept.meta["step"] == 2 and kept.training_state["position"]["step"] == 2

    # with space again, resume=true continues from it to the end
    shutil.rmtree(run_dir / "checkpoints")
    shutil.copytree(saved, run_dir / "checkpoints")
    result = run_stage("pretrain", run_dir, *[a for a in args if not a.startswith("hydra.run.dir")], "resume=true")
    assert result["resume"]["step"] == 2 and result["metrics"]["steps"] == 6
