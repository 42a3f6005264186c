"""Running a study's runs as the existing stages, so that an interrupted study loses nothing.

A stage whose folder holds a `result.json` with status ok is finished and is not run again (its
result is read back); a stage whose folder holds `checkpoints/last` continues from it
(`resume=true`); any other stage starts fresh. A run is finished when its `run.json` exists (it is
written atomically, last).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from framework.results import atomic_write_text, finished_result
from framework.study.plan import Run, StudyPlan, compose_stage


def run_stage_once(stage: str, overrides, stage_dir: Path, function: Callable, **updates) -> dict[str, Any]:
    """Run `stage` in `stage_dir` unless it finished there before; resume it if it has a checkpoint."""
    done = finished_result(stage_dir)
    if done is not None:
        return done
    resume = (stage_dir / "checkpoints" / "last").is_dir()
    cfg = compose_stage(stage, overrides, stage_dir, resume=resume, **updates)
    started = time.time()
    function(cfg)
    done = finished_result(stage_dir)
    if done is None:  # the stages write result.json themselves; this is a bug, not bad input
        raise RuntimeError(f"stage {stage} in {stage_dir} ended without an ok result.json")
    done.setdefault("metrics", {}).setdefault("seconds", round(time.time() - started, 2))
    return done


def run_pretrain_once(plan: StudyPlan) -> dict[str, Any] | None:
    """The study's full-precision checkpoint: trained once in <study>/pretrain (None if given)."""
    if plan.init_checkpoint:
        return None
    from framework.stages.pretrain import run_pretrain

    return run_stage_once("pretrain", plan.pretrain_overrides, plan.pretrain_dir, run_pretrain)


def read_run(run: Run) -> dict[str, Any] | None:
    try:
        return json.loads((run.dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


#: how decided a search ended (framework.search: its final bit distribution against the fitted policy)
DECISIVENESS = ("entropy", "argmax_bitops_ratio", "fit_changed_layers", "undecided")


def execute_run(plan: StudyPlan, run: Run, landscape: bool) -> dict[str, Any]:
    """Search (if the row does), fine-tune, evaluate and (optionally) measure the landscape of one
    run; returns and writes its `run.json`."""
    from framework.search.loop import run_search
    from framework.stages.evaluate import run_evaluate
    from framework.stages.finetune import run_finetune

    done = read_run(run)
    if done is not None:
        return done
    fp = plan.fp_checkpoint()
    record: dict[str, Any] = {"row": run.row, "seed": run.seed, "dir": str(run.dir.relative_to(plan.dir)),
                              "overrides": list(run.overrides), "stage_seconds": {}}
    policy = run.policy
    if run.searches:
        found = run_stage_once("search", run.overrides, run.dir / "search", run_search, init_checkpoint=fp)
        policy = found["artifacts"]["policy"]
        m = found["metrics"]
        record["search"] = {k: m.get(k) for k in (
            "proxy_top1", "gbitops", "seconds", "steps", "images_processed", "rho", "repair_applied", *DECISIVENESS)}
        record["search"]["method"] = (found.get("config") or {}).get("search", {}).get("method")
        # a result's extra keys sit at the top level of its result.json
        record["search"]["proxy"] = {k: (found.get("proxy") or {}).get(k) for k in ("dataset", "fraction", "size")}
        record["search"]["rho_trace"] = found.get("rho_trace") or []
        record["stage_seconds"]["search"] = m.get("seconds")
    fine = run_stage_once("finetune", run.overrides, run.dir / "finetune", run_finetune, init_checkpoint=fp, policy=policy)
    checkpoint = fine["artifacts"]["checkpoint"]
    record["stage_seconds"]["finetune"] = fine["metrics"].get("seconds")
    record["kernels"] = fine.get("kernels")  # the quantizers' backend, build key and threads of the fine-tune
    # the last validation top-1 (held-out training images): what a selection among rows may read
    record["val_top1"] = (fine.get("history") or [{}])[-1].get("val_top1")
    evaluated = run_stage_once("evaluate", run.overrides, run.dir / "evaluate", run_evaluate, checkpoint=checkpoint)
    record["stage_seconds"]["evaluate"] = evaluated["metrics"].get("seconds")
    m = evaluated["metrics"]
    record.update(top1=m["top1"], gbitops=m["gbitops"], bitops=m["bitops"], size_mb=m["size_mb"],
                  avg_w_bits=m.get("avg_w_bits"), avg_a_bits=m.get("avg_a_bits"))
    policy_file = run.dir / "finetune" / "policy.json"
    record["policy"] = {name: [layer["w_bits"], layer["a_bits"]]
                        for name, layer in json.loads(policy_file.read_text())["layers"].items()}
    record["policy_budget"] = json.loads(policy_file.read_text()).get("budget")
    if landscape:
        from framework.stages.landscape import run_landscape

        shape = run_stage_once("landscape", run.overrides, run.dir / "landscape", run_landscape, checkpoint=checkpoint)
        record["landscape"] = {k: v for k, v in shape["metrics"].items() if not isinstance(v, (list, dict))}
        record["stage_seconds"]["landscape"] = shape["metrics"].get("seconds")
    # the stages' own times: a run resumed in a later session still reports its whole cost
    record["seconds"] = round(sum(v or 0.0 for v in record["stage_seconds"].values()), 2)
    atomic_write_text(run.dir / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
