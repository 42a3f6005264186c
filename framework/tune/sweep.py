"""`mpq sweep`: many proxy searches as one Ray Tune experiment, then the policy to transfer.

1. Plan (framework.tune.plan): the points of `tune.space`, one trial per distinct search config,
   each checked like `mpq search` would check it, before Ray starts.
2. Run: a Ray Tune `Tuner` over the planned trials (`tune.grid_search` over the plan, so the order
   is the plan's) with `tune.cpus_per_trial` / `tune.gpus_per_trial` per trial, at most
   `tune.max_concurrent` at once, ASHA on the epochs (`time_attr="epoch"`, maximising
   `proxy_top1`), `FailureConfig(max_failures=tune.max_failures)`. Ray runs in this process on
   127.0.0.1 or joins a cluster (framework.tune.cluster). Tune's state lives in
   `<run_dir>/tune/sweep/`; when the run directory already holds the experiment of the same plan,
   the sweep is restored with `Tuner.restore` (`resume=true` / `tune.resume=true` insists on it):
   finished trials are not run again, unfinished and failed ones continue from their own
   checkpoints. Another plan in the same folder is a new experiment, whose trials identical to
   finished ones reuse their results.
3. Select (framework.tune.select): among the finished trials, the Pareto front of proxy top-1
   against the BitOps of their policies and the most accurate policy under the budget
   (`search.budget_bitops`, else the budget the trials' policies record), written as `policy.json`
   with the trial's provenance plus the sweep's, with `pareto.png` and the table of trials in
   `result.json` (and `trials.json`, which is also written when a sweep is interrupted).

The selection is made on the proxy: what the sweep optimises is what a policy search can see.
Fine-tuning the best `tune.top_k` policies on the target is the pipeline's business
(`result.extra["selection"]["top"]` lists their policy files).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.errors import MPQError
from framework.results import Result, atomic_write_text, write_result
from framework.stage import load_full_precision_checkpoint
from framework.train.resume import Interrupted
from framework.tune.plan import Plan, make_plan
from framework.tune.select import best_under_budget, pareto_front, top_under_budget
from framework.tune.trial import AIM_RUN, TrialContext, finished_result, read_attempts, run_trial

log = logging.getLogger(__name__)

EXPERIMENT = "sweep"  # Tune's experiment folder: <run_dir>/tune/sweep (then sweep_2, ... for other plans)


class SweepInterrupted(Interrupted):
    """The sweep stopped (Ctrl-C, SIGUSR1) before every trial ended; Tune saved its state."""

    def __init__(self, experiment: Path, finished: int, total: int):
        MPQError.__init__(
            self, f"sweep interrupted with {finished} of {total} trials finished; its state is in {experiment}; run the "
                  f"same command with resume=true (and the same hydra.run.dir) to continue without rerunning finished trials")
        self.signal_name, self.checkpoint, self.step = "interrupt", experiment, finished


def _trial_dirname(trial) -> str:
    """Tune's folder for a trial: `<index>_<key>`, so results map back to the plan by name."""
    spec = trial.config["trial"]
    return f"{spec['index']:03d}_{spec['key']}"


def _stopped_record(run_dir: Path, name: str) -> Path:
    """Where the experiment's scheduler records its early stops (framework.tune.scheduler)."""
    return run_dir / "tune" / f"{name}.stopped.jsonl"


def _scheduler(tcfg: DictConfig, plan: Plan, record: Path):
    from framework.tune.scheduler import build_scheduler

    max_t = int(tcfg.scheduler.max_t or max(int(plan.config(t).search.epochs) for t in plan.trials))
    grace = int(tcfg.scheduler.grace_period)
    if tcfg.scheduler.name == "asha" and grace > max_t:
        raise MPQError(f"tune.scheduler.grace_period={grace} is longer than a trial ({max_t} epochs, tune.scheduler.max_t "
                       f"or search.epochs); lower it or raise search.epochs")
    return build_scheduler(str(tcfg.scheduler.name), record, grace, float(tcfg.scheduler.reduction_factor), max_t)


def _plan_record(plan: Plan) -> dict[str, Any]:
    return {"trials": [t.as_dict() for t in plan.trials], "duplicates": plan.duplicates,
            "dimensions": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in plan.dimensions]}


def _experiment(run_dir: Path, plan: Plan) -> tuple[str, bool]:
    """The Tune experiment of this plan in `run_dir/tune/` and whether to restore it.

    Tune restores an experiment with the trial list it was started with, so an experiment is
    restored only for the same plan (same trial keys in the same order). Another plan in the same
    run directory (more seeds, another space) is a new experiment `sweep_<n>` beside the old ones;
    its trials that are identical to finished ones are not run again (their folders are shared).
    """
    from ray import tune

    keys = [t.key for t in plan.trials]
    names = sorted((p.name[: -len(".plan.json")] for p in (run_dir / "tune").glob("*.plan.json")),
                   key=lambda n: int(n.rpartition("_")[2]) if n.rpartition("_")[2].isdigit() else 1)
    for name in names:
        recorded = [t["key"] for t in json.loads((run_dir / "tune" / f"{name}.plan.json").read_text())["trials"]]
        if recorded == keys and tune.Tuner.can_restore(str(run_dir / "tune" / name)):
            return name, True
    return (EXPERIMENT if not names else f"{EXPERIMENT}_{len(names) + 1}"), False


def _tuner(cfg: DictConfig, plan: Plan, context: TrialContext, run_dir: Path, name: str, restore: bool, scheduler: Any):
    from ray import tune

    tcfg = cfg.tune
    resources = {"cpu": float(tcfg.cpus_per_trial), "gpu": float(tcfg.gpus_per_trial or 0)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    experiment_dir = run_dir / "tune" / name
    if restore:
        log.info("restoring the sweep in %s", experiment_dir)
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.as_dict() for t in plan.trials])},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, num_samples=1, max_concurrent_trials=tcfg.max_concurrent,
            reuse_actors=bool(tcfg.reuse_actors), trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(run_dir / "tune"),
            failure_config=tune.FailureConfig(max_failures=int(tcfg.max_failures)), verbose=1,
        ),
    )


def _error_summary(error: Any) -> str:
    """The last line of an error (Ray's trial errors end with the exception's message)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(error).__name__)[:500]


def collect_trials(plan: Plan, context: TrialContext, grid: Any, stopped: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table of trials: each planned trial with its status and numbers.

    `finished` (its search wrote result.json), `stopped` (ASHA ended it early: `stopped`, the
    scheduler's record), `error` (it failed after its retries, or a user error), `unfinished` /
    `not started` (the sweep ended before the trial did: it was interrupted).
    """
    by_key = {}
    for result in grid or []:
        by_key[Path(result.path).name.split("_", 1)[-1]] = result
    rows = []
    for trial in plan.trials:
        trial_dir = context.trial_dir(trial.key)
        tune_result = by_key.get(trial.key)
        metrics = dict(tune_result.metrics or {}) if tune_result is not None else {}
        row: dict[str, Any] = {"index": trial.index, "key": trial.key, "overrides": trial.overrides, "run_dir": str(trial_dir),
                               "status": None, "epochs": metrics.get("epoch"), "proxy_top1": None, "bitops": None,
                               "gbitops": None, "expected_bitops": metrics.get("expected_bitops"), "budget_bitops": None,
                               "policy": None, "error": None, "attempts": len(read_attempts(trial_dir))}
        aim_file = trial_dir / AIM_RUN
        row["aim_run"] = aim_file.read_text().strip() if aim_file.exists() else None
        done = finished_result(trial_dir)
        if done is not None:
            from framework.policy import read_policy

            policy_path = done["artifacts"]["policy"]
            policy = read_policy(policy_path)
            row.update(status="finished", proxy_top1=done["metrics"]["proxy_top1"], bitops=done["metrics"]["bitops"],
                       gbitops=done["metrics"]["gbitops"], epochs=len(done.get("history") or []) or row["epochs"],
                       expected_bitops=(done["metrics"].get("expected_gbitops") or 0.0) * 1e9, policy=policy_path,
                       budget_bitops=policy.budget.bitops if policy.budget else None)
        elif tune_result is not None and tune_result.error is not None:
            row.update(status="error", error=_error_summary(tune_result.error))
        elif metrics.get("error"):
            row.update(status="error", error=metrics["error"])
        elif trial.key in stopped:
            entry = stopped[trial.key]
            top1 = entry.get("proxy_top1")
            row.update(status="stopped", epochs=entry.get("epoch"),
                       proxy_top1=top1 if isinstance(top1, (int, float)) and math.isfinite(top1) else None)
        else:
            row.update(status="unfinished" if row["attempts"] else "not started")
        rows.append(row)
    return rows


def _selection_budget(cfg: DictConfig, finished: list[dict[str, Any]]) -> float | None:
    """`search.budget_bitops`, else the one budget every finished policy records (from
    `search.budget_uniform_bits`), else None (the selection then says what to set)."""
    explicit = cfg.search.budget_bitops
    if explicit:
        return float(explicit)
    budgets = {row["budget_bitops"] for row in finished if row["budget_bitops"]}
    if len(budgets) > 1:
        raise MPQError(f"the trials searched under {len(budgets)} different budgets; set search.budget_bitops=<BitOps> "
                       f"to select under one")
    return budgets.pop() if budgets else None


def _aim_repo(plan: Plan) -> str | None:
    """The trials' local Aim repository, or None (tracking off, or a remote server)."""
    tracking = plan.base["tracking"]
    repo = str(tracking["repo"])
    return None if not tracking["enabled"] or repo.startswith("aim://") else repo


def _create_aim_repo(plan: Plan) -> None:
    """Create the Aim repository before trials start: two trials creating it at once race (one
    sees a half-made repository and fails)."""
    repo = _aim_repo(plan)
    if repo is None:
        return
    from aim import Repo

    Path(repo).mkdir(parents=True, exist_ok=True)
    try:
        Repo.from_path(repo, init=True)
    except Exception as err:
        raise MPQError(f"cannot open the Aim repository {repo} ({type(err).__name__}: {err}); set tracking.repo to a "
                       f"writable folder or aim://host:port, or tracking.enabled=false") from None


def _index_aim_runs(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """Make every trial's Aim run visible to Aim's SDK (trials index their own on close, but a
    stopped or killed trial may not have; this driver indexes them one after another)."""
    repo = _aim_repo(plan)
    if repo is None:
        return
    from framework.track.aim_tracker import index_run

    for row in rows:
        if row["aim_run"]:
            index_run(repo, row["aim_run"])


def _write_selected(best: dict[str, Any], rows: list[dict[str, Any]], front: list[dict[str, Any]], budget: float,
                    context: TrialContext, run_dir: Path) -> dict[str, str]:
    """The selected trial's policy as `<run_dir>/policy.json`, its provenance extended by the sweep's."""
    from framework.policy import read_policy, write_policy

    policy = read_policy(best["policy"])
    provenance = dict(policy.provenance)
    provenance["sweep"] = {
        "trial": best["key"], "index": best["index"], "overrides": best["overrides"], "trial_dir": best["run_dir"],
        "aim_run": best["aim_run"], "sweep_dir": str(run_dir), "experiment": context.experiment,
        "selected_by": "highest proxy_top1 among finished trials with bitops <= budget_bitops",
        "proxy_top1": best["proxy_top1"], "bitops": best["bitops"], "budget_bitops": budget,
        "on_pareto_front": any(t["key"] == best["key"] for t in front),
        "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
    }
    return write_policy(policy.model_copy(update={"provenance": provenance}), run_dir / "policy.json")


def format_trials(rows: list[dict[str, Any]], selected: str | None = None) -> str:
    """The table of trials `mpq sweep` prints."""
    head = f"  {'#':>3}  {'trial':<12}  {'status':<11}{'epochs':>7}{'proxy top-1':>13}{'GBitOps':>10}  overrides"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for row in rows:
        top1 = f"{100 * row['proxy_top1']:.2f} %" if row["proxy_top1"] is not None else "-"
        gbitops = f"{row['bitops'] / 1e9:.4f}" if row["bitops"] else "-"
        mark = " *" if row["key"] == selected else ""
        overrides = " ".join(f"{k}={v}" for k, v in row["overrides"].items())
        lines.append(f"  {row['index']:>3}  {row['key']:<12}  {row['status']:<11}{row['epochs'] or 0:>7}{top1:>13}"
                     f"{gbitops:>10}  {overrides}{mark}")
    return "\n".join(lines)


def run_sweep(cfg: DictConfig) -> Result:
    """Run the sweep `cfg.tune` describes over proxy searches and select the policy to transfer.

    Writes into `cfg.run_dir`: `trials/<key>/` (each trial's search), `tune/sweep/` (Tune's
    state, for restore), `plan.json`, `trials.json`, `policy.json` (+ `policy.png`), `pareto.png`
    and `result.json`. Raises :class:`SweepInterrupted` (status 143 from `mpq`) when the sweep is
    stopped before its trials end, and :class:`MPQError` for bad input or nothing to select.
    """
    from framework.tune.cluster import ray_session
    from framework.tune.plot import plot_pareto

    stage = "sweep"
    started = time.time()
    run_dir = Path(cfg.run_dir or Path("outputs") / stage / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.tune
    load_full_precision_checkpoint(cfg, stage)  # a missing or quantized checkpoint is an error before Ray starts
    plan = make_plan(cfg)
    experiment = str(tcfg.name or cfg.experiment_name)
    threads = max(1, int(math.floor(float(tcfg.cpus_per_trial))))
    context = TrialContext(plan.base, plan.methods, str(run_dir), experiment, threads)

    name, restore = _experiment(run_dir, plan)
    experiment_dir = run_dir / "tune" / name
    if (cfg.resume or tcfg.resume) and not restore:
        raise MPQError(f"resume=true: there is no sweep of these {len(plan.trials)} trials to restore in {run_dir}; point "
                       f"hydra.run.dir at the interrupted sweep's folder and give its config, or drop resume")
    record = json.dumps(_plan_record(plan), indent=2, default=str) + "\n"
    plan_path = run_dir / "plan.json"
    atomic_write_text(plan_path, record)
    atomic_write_text(run_dir / "tune" / f"{name}.plan.json", record)
    log.info("sweep of %d trials (%d duplicate points skipped) over %s, %s per trial, in %s", len(plan.trials),
             len(plan.duplicates), ", ".join(d.key for d in plan.dimensions), f"{tcfg.cpus_per_trial} CPU", run_dir)

    scheduler = _scheduler(tcfg, plan, _stopped_record(run_dir, name))  # its errors too come before Ray starts
    _create_aim_repo(plan)
    with ray_session(tcfg) as ray_info:
        grid = _tuner(cfg, plan, context, run_dir, name, restore, scheduler).fit()
    from framework.tune.scheduler import stopped_early

    rows = collect_trials(plan, context, grid, stopped_early(_stopped_record(run_dir, name)))
    interrupted = any(row["status"] in ("unfinished", "not started") for row in rows)
    atomic_write_text(run_dir / "trials.json", json.dumps(rows, indent=2, default=str) + "\n")
    _index_aim_runs(plan, rows)
    finished = [row for row in rows if row["status"] == "finished"]
    if interrupted:
        raise SweepInterrupted(experiment_dir, len(finished), len(rows))
    if not finished:
        errors = [f"trial {r['key']}: {r['error']}" for r in rows if r["error"]]
        raise MPQError(f"no trial of the sweep finished ({len(rows)} planned, "
                       f"{sum(r['status'] == 'stopped' for r in rows)} stopped, {len(errors)} failed)"
                       + (f"; first error: {errors[0]}" if errors else "") + f"; see {run_dir / 'trials.json'}")

    budget = _selection_budget(cfg, finished)
    front = pareto_front(finished)
    best = best_under_budget(finished, budget)
    top = top_under_budget(finished, budget, int(tcfg.top_k))
    artifacts = _write_selected(best, rows, front, budget, context, run_dir)
    artifacts["pareto_plot"] = str(plot_pareto(rows, front, run_dir / "pareto.png", budget, best, title=f"{experiment} sweep"))
    artifacts.update(trials_table=str(run_dir / "trials.json"), experiment=str(experiment_dir), plan=str(plan_path))
    metrics = {
        "trials": len(rows), "finished": len(finished), "stopped": sum(r["status"] == "stopped" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows), "duplicates": len(plan.duplicates),
        "selected_trial": best["key"], "proxy_top1": best["proxy_top1"], "bitops": best["bitops"],
        "gbitops": best["bitops"] / 1e9, "budget_bitops": budget, "budget_gbitops": budget / 1e9,
        "pareto_size": len(front), "seconds": round(time.time() - started, 2),
    }
    selection = {
        "budget_bitops": budget, "metric": "proxy_top1", "best": best["key"], "pareto_front": [t["key"] for t in front],
        "top": [{"key": t["key"], "policy": t["policy"], "proxy_top1": t["proxy_top1"], "bitops": t["bitops"]} for t in top],
    }
    result = Result(stage, metrics=metrics, artifacts=artifacts,
                    extra={"trials": rows, "selection": selection, "ray": {"mode": ray_info["mode"]},
                           "restored": restore, "dimensions": _plan_record(plan)["dimensions"]})
    write_result(run_dir, result, cfg)
    print(f"\nmpq sweep: {len(rows)} trials in {run_dir}\n{format_trials(rows, best['key'])}\n"
          f"selected: trial {best['key']} (proxy top-1 {100 * best['proxy_top1']:.2f} %, {best['bitops'] / 1e9:.4f} GBitOps, "
          f"budget {budget / 1e9:.4f}) -> {artifacts['policy']}; Pareto plot {artifacts['pareto_plot']}")
    return result


__all__ = ["SweepInterrupted", "collect_trials", "format_trials", "run_sweep"]
