"""The outcome of a sweep: the table of its trials, the budget it selects under, the selected
policy with the sweep's provenance, and the table `mpq sweep` prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.errors import MPQError
from framework.policy import read_policy, write_policy
from framework.results import finished_result
from framework.tune.plan import Plan
from framework.tune.trial import AIM_RUN, TrialContext, read_attempts


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


def selection_budget(cfg: DictConfig, finished: list[dict[str, Any]]) -> float | None:
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


def write_selected(best: dict[str, Any], rows: list[dict[str, Any]], front: list[dict[str, Any]], budget: float,
                    context: TrialContext, run_dir: Path) -> dict[str, str]:
    """The selected trial's policy as `<run_dir>/policy.json`, its provenance extended by the sweep's."""
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
