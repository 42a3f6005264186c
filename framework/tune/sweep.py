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
from framework.tune.report import collect_trials, format_trials, selection_budget, write_selected
from framework.tune.select import best_under_budget, pareto_front, top_under_budget
from framework.tune.tracking import create_aim_repo, index_aim_runs
from framework.tune.trial import TrialContext, run_trial

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
    create_aim_repo(plan)
    with ray_session(tcfg) as ray_info:
        grid = _tuner(cfg, plan, context, run_dir, name, restore, scheduler).fit()
    from framework.tune.scheduler import stopped_early

    rows = collect_trials(plan, context, grid, stopped_early(_stopped_record(run_dir, name)))
    interrupted = any(row["status"] in ("unfinished", "not started") for row in rows)
    atomic_write_text(run_dir / "trials.json", json.dumps(rows, indent=2, default=str) + "\n")
    index_aim_runs(plan, rows)
    finished = [row for row in rows if row["status"] == "finished"]
    if interrupted:
        raise SweepInterrupted(experiment_dir, len(finished), len(rows))
    if not finished:
        errors = [f"trial {r['key']}: {r['error']}" for r in rows if r["error"]]
        raise MPQError(f"no trial of the sweep finished ({len(rows)} planned, "
                       f"{sum(r['status'] == 'stopped' for r in rows)} stopped, {len(errors)} failed)"
                       + (f"; first error: {errors[0]}" if errors else "") + f"; see {run_dir / 'trials.json'}")

    budget = selection_budget(cfg, finished)
    front = pareto_front(finished)
    best = best_under_budget(finished, budget)
    top = top_under_budget(finished, budget, int(tcfg.top_k))
    artifacts = write_selected(best, rows, front, budget, context, run_dir)
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
