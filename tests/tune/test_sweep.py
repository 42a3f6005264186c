"""Real sweeps with Ray on 127.0.0.1: ASHA, a killed trial retried, restore after an interruption,
the selected policy, and one Aim run per trial read back through Aim's SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from framework.paths import REPO_ROOT
from framework.policy import read_policy
from framework.tune.plan import make_plan
from framework.tune.sweep import run_sweep
from framework.tune.trial import checkpoint_step, finished_result, read_attempts
from tests.conftest import read_json, wait_for
from tests.tune.conftest import sweep_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # real Ray Tune sweeps, a trial killed, a sweep interrupted: `make test-all`

# One dimension, so the plan's order is the grid's: two good learning rates, then a trial that
# cannot learn (its fresh proxy head never moves: chance accuracy), then a good one. With two
# trials at a time the third starts only once one of the first two has reported epoch 1, so ASHA
# has a better result at that rung and must stop it. That trial is also the one killed mid-epoch:
# its fate is known, so its retry must end exactly as an uninterrupted run of it would.
LEARNING_RATES = [0.05, 0.1, 0.0, 0.08]
ASHA_SWEEP = [
    "~tune.space", f"+tune.space={{search: {{lr_weights: {{grid: [{', '.join(map(str, LEARNING_RATES))}]}}}}}}",
    "search.epochs=3", "tune.scheduler.name=asha", "tune.scheduler.grace_period=1", "tune.scheduler.reduction_factor=2",
    "tune.max_failures=2", "tune.name=sweep_test", "checkpoint_every=2",
]


def _kill_when_checkpointed(trial_dir: Path, killed: dict, timeout: float = 240.0) -> None:
    """SIGKILL the process running the trial once it has a mid-epoch checkpoint (what an OOM kill
    or a lost node does to a worker); records the pid and the checkpoint step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = checkpoint_step(trial_dir)
        attempts = read_attempts(trial_dir)
        if step and attempts and finished_result(trial_dir) is None:
            killed.update(pid=attempts[-1]["pid"], step=step)
            os.kill(attempts[-1]["pid"], signal.SIGKILL)
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, pretrained_checkpoint, embedded_ray):
    run_dir = tmp_path_factory.mktemp("asha_sweep")
    cfg = sweep_config(run_dir, pretrained_checkpoint, *ASHA_SWEEP, f"tracking.repo={run_dir / 'aim'}")
    plan = make_plan(cfg)
    victim = next(t for t in plan.trials if t.overrides["search.lr_weights"] == 0.0)
    killed: dict = {}
    killer = threading.Thread(target=_kill_when_checkpointed, args=(run_dir / "trials" / victim.key, killed), daemon=True)
    killer.start()
    result = run_sweep(cfg)
    killer.join(timeout=1)
    return {"run_dir": run_dir, "result": result, "json": read_json(run_dir / "result.json"), "plan": plan,
            "victim": victim, "killed": killed}


def _rows(sweep) -> dict[float, dict]:
    return {row["overrides"]["search.lr_weights"]: row for row in sweep["json"]["trials"]}


def test_asha_stops_the_trial_that_cannot_learn_after_its_first_epoch(asha_sweep):
    rows = _rows(asha_sweep)
    assert set(rows) == set(LEARNING_RATES)
    assert rows[0.0]["status"] == "stopped" and rows[0.0]["epochs"] == 1
    assert not (Path(rows[0.0]["run_dir"]) / "result.json").exists()
    metrics = asha_sweep["json"]["metrics"]
    assert metrics["stopped"] == sum(row["status"] == "stopped" for row in rows.values()) >= 1
    assert metrics["finished"] == len(LEARNING_RATES) - metrics["stopped"] >= 1  # none failed or was left unfinished
    for row in rows.values():
        if row["status"] == "finished":
            assert row["epochs"] == 3 and (Path(row["run_dir"]) / "policy.json").exists()


@pytest.mark.faults
def test_a_killed_trial_is_retried_from_its_checkpoint(asha_sweep):
    killed, victim = asha_sweep["killed"], asha_sweep["victim"]
    assert killed, "the trial ended before it could be killed"
    attempts = read_attempts(asha_sweep["run_dir"] / "trials" / victim.key)
    assert [a["action"] for a in attempts[:2]] == ["run", "resume"]
    assert attempts[0]["pid"] == killed["pid"] and attempts[1]["pid"] != killed["pid"]
    assert attempts[1]["from_step"] >= killed["step"] >= 2
    row = _rows(asha_sweep)[0.0]  # judged after its retry as without the kill: stopped at the first rung
    assert (row["status"], row["epochs"]) == ("stopped", 1)


def test_the_selected_policy_is_the_most_accurate_finished_trial_under_budget(asha_sweep):
    result, run_dir = asha_sweep["json"], asha_sweep["run_dir"]
    budget = result["metrics"]["budget_bitops"]
    finished = [r for r in result["trials"] if r["status"] == "finished"]
    under = [r for r in finished if r["bitops"] <= budget]
    best = max(under, key=lambda r: (r["proxy_top1"], -r["bitops"]))
    assert result["metrics"]["selected_trial"] == best["key"]
    policy = read_policy(run_dir / "policy.json")
    assert policy.cost["target"].bitops <= budget == policy.budget.bitops
    assert policy.provenance["sweep"]["trial"] == best["key"]
    assert policy.provenance["hyperparameters"]["lr_weights"] == best["overrides"]["search.lr_weights"]
    assert policy.provenance["method"] == "asga" and policy.provenance["proxy"]["dataset"] == "mnist"
    assert result["selection"]["pareto_front"] and best["key"] in [t["key"] for t in result["selection"]["top"]]
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_json(run_dir / "trials.json") == result["trials"]


def test_each_trial_has_one_aim_run_with_its_hparams(asha_sweep):
    from aim import Repo

    repo = Repo.from_path(str(asha_sweep["run_dir"] / "aim"))
    runs = [run for run in repo.iter_runs() if run.experiment == "sweep_test"]
    by_key = {}
    for run in runs:
        hparams = run["hparams"]
        by_key.setdefault(hparams["trial"]["key"], []).append(hparams)
    assert sorted(by_key) == sorted(t.key for t in asha_sweep["plan"].trials)
    for trial in asha_sweep["plan"].trials:
        (hparams,) = by_key[trial.key]  # the killed trial's retry continued its run
        assert hparams["search"]["lr_weights"] == trial.overrides["search.lr_weights"]
        assert hparams["trial"]["overrides"] == [f"search.lr_weights={trial.overrides['search.lr_weights']}"]
        assert hparams["experiment_name"] == "sweep_test"


RESTORE_SWEEP = ["~tune.space", "+tune.space={seed: {range: [0, 4]}}", "search.epochs=2", "tune.scheduler.name=fifo",
                 "checkpoint_every=2", "tracking.enabled=false"]


@pytest.mark.faults
def test_an_interrupted_sweep_restores_and_finished_trials_never_run_twice(tmp_path, pretrained_checkpoint, embedded_ray):
    checkpoint = pretrained_checkpoint
    trials = tmp_path / "trials"
    proc = subprocess.Popen([sys.executable, "-m", "tests.tune.sweep_main", str(tmp_path), checkpoint, *RESTORE_SWEEP],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def state():  # finished trials, and trials in their first epoch (of 10 steps) with a checkpoint
        dirs = [d for d in trials.iterdir() if d.is_dir()] if trials.exists() else []
        return ([d for d in dirs if finished_result(d)],
                [d for d in dirs if not finished_result(d) and 2 <= (checkpoint_step(d) or 0) <= 10])

    wait_for(lambda: state()[0] and state()[1], proc, timeout=240, what="the sweep (a finished and a running trial)")
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops its trials and saves the experiment's state
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "sweep interrupted" in stderr and "resume=true" in stderr, stderr[-3000:]
    before = {row["key"]: row for row in read_json(tmp_path / "trials.json")}
    done_before = {k for k, row in before.items() if row["status"] == "finished"}
    assert done_before and len(done_before) < 4
    stamps = {k: (trials / k / "result.json").stat().st_mtime_ns for k in done_before}
    attempts_before = {k: len(read_attempts(trials / k)) for k in before}
    cut = {k: checkpoint_step(trials / k) for k, row in before.items() if row["status"] == "unfinished"}
    assert any(cut.values()), f"no trial with a checkpoint was running when the sweep was interrupted: {before}"

    result = run_sweep(sweep_config(tmp_path, checkpoint, *RESTORE_SWEEP, "resume=true"))
    after = read_json(tmp_path / "result.json")
    assert after["restored"] is True and result.metrics["finished"] == 4
    for key in done_before:  # not run again: same result file, no new run or resume
        assert (trials / key / "result.json").stat().st_mtime_ns == stamps[key]
        assert all(a["action"] == "reuse" for a in read_attempts(trials / key)[attempts_before[key]:])
    for key, step in cut.items():
        last = read_attempts(trials / key)[-1]
        assert last["action"] == ("resume" if step else "run") and last["from_step"] == step

    # a wider sweep in the same folder is a new experiment; its 4 trials that already finished are reused
    stamps = {k: (trials / k / "result.json").stat().st_mtime_ns for k in before}
    wider = [o if not o.startswith("+tune.space") else "+tune.space={seed: {range: [0, 5]}}" for o in RESTORE_SWEEP]
    result = run_sweep(sweep_config(tmp_path, checkpoint, *wider))
    assert result.metrics["finished"] == 5 and result.extra["restored"] is False
    assert (tmp_path / "tune" / "sweep_2").is_dir()
    for key in before:
        assert (trials / key / "result.json").stat().st_mtime_ns == stamps[key]
        assert read_attempts(trials / key)[-1]["action"] == "reuse"
    (new,) = [row for row in result.extra["trials"] if row["key"] not in before]
    assert [a["action"] for a in read_attempts(Path(new["run_dir"]))] == ["run"]
