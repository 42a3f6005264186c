"""`mpq study study=<name>`: every row and seed of a transfer study as the existing stages, then
`study.json` and `study.md` in the study's folder (`outputs/study/<name>` by default).

The study resumes: rerun the same command and finished runs are read back, an interrupted one
continues from its checkpoints (framework.study.execute). With `launcher=slurm` the
full-precision pretraining and then every unfinished run (one per row and seed) are Slurm jobs of
this same command restricted to one run (`study.only=<row>/<seed>`, `study.only=pretrain`); the
report is written once they have all finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.errors import MPQError
from framework.results import Result, finished_result, write_result
from framework.search.loop import check_search_budget
from framework.stage import run_directory
from framework.stage.checks import check_policy_spec
from framework.study.execute import execute_run, read_run, run_pretrain_once
from framework.study.plan import StudyPlan, compose_stage, plan_study
from framework.study.report import build_report, write_report

log = logging.getLogger(__name__)

#: a Slurm launcher: [(overrides of `mpq study`, run folder)] -> waits until every job ended, raises if one failed
Launch = Callable[[list[tuple[list[str], Path]]], None]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per finished run: runs done of total, elapsed time, estimated time remaining (from
    the runs computed in this session)."""

    def __init__(self, name: str, total: int, done: int):
        self.name, self.total, self.done = name, total, done
        self.started, self.computed = time.time(), 0

    def finished(self, label: str, record: dict[str, Any], computed: bool) -> None:
        self.done += 1
        self.computed += int(computed)
        elapsed = time.time() - self.started
        left = self.total - self.done
        eta = _clock(elapsed / self.computed * left) if self.computed and left else ("0:00:00" if not left else "?")
        print(f"study {self.name}: {self.done}/{self.total} runs done, elapsed {_clock(elapsed)}, "
              f"about {eta} remaining; {label}: top-1 {100 * record['top1']:.2f} %, {record['gbitops']:.4f} GBitOps"
              f"{'' if computed else ' (finished before)'}", flush=True)


def study_folder(cfg: DictConfig) -> Path:
    """`study.dir` (a Slurm job of the study names it) or the run directory of `mpq study`."""
    if cfg.study.dir:
        return Path(cfg.study.dir)
    return run_directory(cfg, "study")


def check_plan(plan: StudyPlan) -> None:
    """Every row's stages composed and validated, its policy spec resolved on the untrained model
    and its search budget checked against its search space, at the first seed (the seeds change only
    `seed=` and which random draw): a bad row is one error line before the pretraining starts."""
    for row in plan.rows:
        pending = [r for r in plan.runs if r.row == str(row["name"]) and read_run(r) is None]
        if not pending:
            continue  # every seed of the row finished
        run = pending[0]
        try:
            finetune = compose_stage("finetune", run.overrides, run.dir / "finetune", policy=run.policy)
            compose_stage("evaluate", run.overrides, run.dir / "evaluate")
            if run.searches:
                check_search_budget(compose_stage("search", run.overrides, run.dir / "search"))
            elif run.policy:
                check_policy_spec(finetune, run.policy)
        except MPQError as err:
            raise MPQError(f"study {plan.name}, row {run.row}: {err}") from None


def run_study(cfg: DictConfig, launch: Launch | None = None) -> Result:
    """Run (or resume) the study `cfg.study`; write study.json, study.md, figures/ and result.json."""
    if "study" not in cfg or cfg.study is None:
        raise MPQError("mpq study needs study=<name>, e.g. study=smoke (the studies are the files of conf/study/)")
    folder = study_folder(cfg).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_study(cfg, folder)
    landscape = bool(cfg.study.landscape)
    if cfg.study.only:  # one run of the study, as a Slurm job runs it
        if str(cfg.study.only) == "pretrain":
            result = run_pretrain_once(plan)
        else:
            result = execute_run(plan, plan.find(str(cfg.study.only)), landscape)
        out = Result("study", metrics={"only": str(cfg.study.only)}, extra={"run": result})
        write_result(Path(cfg.run_dir) if cfg.run_dir else folder, out, cfg)
        return out

    check_plan(plan)  # every row's stages and policy, before the first step of any
    if launch is not None:
        _dispatch(plan, launch)
    fp = run_pretrain_once(plan)
    fp_record = _full_precision(plan, fp)
    pending = [run for run in plan.runs if read_run(run) is None]
    progress = Progress(plan.name, len(plan.runs), len(plan.runs) - len(pending))
    print(f"study {plan.name}: {len(plan.runs)} runs ({len(plan.rows)} rows x {len(cfg.study.seeds)} seeds), "
          f"{len(plan.runs) - len(pending)} finished before; folder {folder}", flush=True)
    for run in plan.runs:
        if run in pending:
            record = execute_run(plan, run, landscape)
            progress.finished(f"{run.row} seed {run.seed}", record, computed=True)
    records = [read_run(run) for run in plan.runs]
    report = build_report(_study_record(cfg, plan), plan.rows, records, fp_record, folder)
    artifacts = write_report(report, folder)
    metrics = {"runs": len(records), "rows": len(plan.rows), "wall_seconds": report["wall_seconds"]}
    result = Result("study", metrics=metrics, artifacts=artifacts, extra={"rows": report["rows"]})
    write_result(folder, result, cfg)
    print(f"study {plan.name}: report in {folder / 'study.md'} and {folder / 'study.json'}", flush=True)
    return result


def _study_record(cfg: DictConfig, plan: StudyPlan) -> dict[str, Any]:
    s = cfg.study
    return {"name": plan.name, "seeds": [int(x) for x in s.seeds], "rows": plan.rows,
            "reference": s.reference, "baselines": list(s.baselines), "overrides": list(s.overrides),
            "pretrain": list(s.pretrain), "init_checkpoint": s.init_checkpoint}


def _full_precision(plan: StudyPlan, fp: dict[str, Any] | None) -> dict[str, Any]:
    if fp is None:  # a given checkpoint: its own run's result.json, if it is beside it
        done = finished_result(Path(plan.fp_checkpoint()).parent.parent)
        return {"checkpoint": plan.fp_checkpoint(), "top1": (done or {}).get("metrics", {}).get("top1"), "seconds": None}
    return {"checkpoint": str(Path(plan.fp_checkpoint()).relative_to(plan.dir)), "top1": fp["metrics"].get("top1"),
            "seconds": fp["metrics"].get("seconds")}


def _dispatch(plan: StudyPlan, launch: Launch) -> None:
    """Slurm: the pretraining job first (if needed), then one job per unfinished run."""
    base = [f"study.dir={plan.dir}"]
    if not plan.init_checkpoint and finished_result(plan.pretrain_dir) is None:
        launch([([*base, "study.only=pretrain"], plan.dir / "slurm" / "pretrain")])
    jobs = [([*base, f"study.only={run.key}"], plan.dir / "slurm" / run.row / f"seed{run.seed}")
            for run in plan.runs if read_run(run) is None]
    if jobs:
        print(f"study {plan.name}: {len(jobs)} runs submitted as Slurm jobs", flush=True)
        launch(jobs)
    missing = [run.key for run in plan.runs if read_run(run) is None]
    if missing:
        raise MPQError(f"study {plan.name}: the Slurm jobs ended but {len(missing)} runs have no run.json "
                       f"({', '.join(missing[:3])}); see {plan.dir / 'slurm'}")
