"""Many jobs started at once against one new tracking repository (a Slurm array, a multirun) all
run and are all tracked; a tracking failure after the start does not end the training."""

from __future__ import annotations

import errno
import logging
import os
import subprocess

import pytest
from aim import Repo

from framework.track import aim_tracker
from framework.track.aim_tracker import LOCK_NAME, Tracker
from tests.conftest import MPQ, assert_one_error_line, read_result, run_mpq_in_process

JOBS = 6
TINY = ["data=fashion_mnist", "model=resnet8", "data.fraction=0.01", "data.test_fraction=0.02", "train.epochs=1",
        "train.max_steps=2"]


@pytest.mark.slow  # six processes at once: `make test-all`
def test_six_jobs_at_once_against_a_new_repository_all_run_and_are_all_readable(tmp_path):
    repo = tmp_path / "aim"  # does not exist yet: the first opener creates it while the others wait
    run_dirs = [tmp_path / f"job{k}" for k in range(JOBS)]
    procs = [subprocess.Popen([MPQ, "pretrain", *TINY, f"tracking.repo={repo}", f"seed={k}", f"hydra.run.dir={run_dir}"],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for k, run_dir in enumerate(run_dirs)]
    errors = [proc.communicate(timeout=900)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * JOBS, [err[-800:] for err in errors]

    hashes = set()
    for run_dir in run_dirs:
        info = read_result(run_dir)["tracking"]
        assert info["enabled"] is True and info["repo"] == str(repo), info
        hashes.add(info["run_hash"])
    assert len(hashes) == JOBS  # six distinct runs
    runs = {run.hash: run for run in Repo.from_path(str(repo)).iter_runs()}
    assert set(runs) == hashes
    for run_hash in hashes:  # each is readable: its name, its config and a metric it tracked
        run = runs[run_hash]
        assert run.name == "pretrain" and run["hparams"]["stage"] == "pretrain"
        assert any(metric.name == "loss" for metric in run.metrics())
    assert (repo / LOCK_NAME).exists()


def test_a_tracking_failure_after_the_start_warns_once_and_switches_tracking_off(tmp_path, caplog):
    tracker = Tracker(repo=str(tmp_path / "aim"), experiment="mpq", run_name="pretrain", hparams={"a": 1}, tags=[])
    tracker.track("loss", 1.0, step=0)
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    tracker._run.track = disk_full
    with caplog.at_level(logging.WARNING, logger=aim_tracker.__name__):
        tracker.track("loss", 0.5, step=1)   # fails: one warning, tracking off
        tracker.track("loss", 0.25, step=2)  # no-ops from here on
        tracker.set("summary", {"top1": 0.5})
        tracker.close()
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "tracking to" in warnings[0] and "No space left on device" in warnings[0]
    assert "tracking is off for the rest of this run" in warnings[0]
    info = tracker.info()
    assert info["enabled"] is False and "No space left on device" in info["failed"]
    assert info["run_hash"] == tracker.run_hash and info["repo"] == str(tmp_path / "aim")


def test_a_repository_path_that_is_a_file_is_one_clear_error_before_any_compute(tmp_path):
    not_a_folder = tmp_path / "aim"
    not_a_folder.write_text("a file where the repository should be\n")
    proc = run_mpq_in_process("pretrain", *TINY, f"tracking.repo={not_a_folder}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_error_line(proc, "pretrain", "cannot open the Aim repository", str(not_a_folder), "1 attempt(s)",
                          "tracking.enabled=false", run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not_a_folder.read_text() == "a file where the repository should be\n"
