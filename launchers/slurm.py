"""`launcher=slurm`: run a stage as a Slurm job through submitit, wait for it, keep its result.

The job runs the same `mpq <stage> ...` command in-process on the allocated nodes with
`launcher=local`, the submitting side's run directory (`hydra.run.dir`), and `resume=true`: a job
that Slurm requeues (`scontrol requeue`, preemption, or submitit's own requeue when the time limit
approaches, via :meth:`StageJob.checkpoint`) receives SIGTERM, saves `checkpoints/last`, and its
next start continues from there instead of from step 0. By default the command waits for the job,
prints its id, and reports a cancelled or failed job as an error, never waiting forever: without
accounting Slurm forgets finished jobs, so a time limit bounds the wait (`launcher.max_wait_min`).

Distributed stages: `dist.nproc=N` asks for N tasks per node (`launcher.nodes` nodes); every task
is one rank, which learns its place from Slurm's variables (:mod:`framework.dist.ranks`), so no
torchrun runs inside the job.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from framework.errors import MPQError


class StageJob:
    """The callable submitit pickles: one `mpq` stage, resumable. `entry` is the `mpq` command's
    `main(argv)` (pickled by reference), passed in so that this module does not import the command."""

    def __init__(self, stage: str, overrides: list[str], run_dir: str, entry: Callable[[list[str]], int]):
        self.stage, self.overrides, self.run_dir, self.entry = stage, list(overrides), str(run_dir), entry

    def argv(self) -> list[str]:
        def key(override: str) -> str:
            return override.split("=", 1)[0].lstrip("+~")

        kept = [o for o in self.overrides
                if key(o) not in ("launcher", "hydra.run.dir", "resume", "stage") and not key(o).startswith("launcher.")]
        return [self.stage, *kept, "launcher=local", f"hydra.run.dir={self.run_dir}", "resume=true"]

    def __call__(self) -> dict[str, Any]:
        import json

        from framework.dist.ranks import current_ranks

        try:
            self.entry(self.argv())
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
        ranks = current_ranks()
        if not ranks.is_main:  # rank 0 wrote result.json
            return {"rank": ranks.rank, "status": "ok"}
        return json.loads((Path(self.run_dir) / "result.json").read_text())

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this before the time limit: requeue the same job (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.stage, self.overrides, self.run_dir, self.entry))


def _executor(cfg, stage: str, folder: Path):
    import submitit

    lcfg = cfg.launcher
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = {
        "name": f"mpq-{stage}",
        "timeout_min": int(lcfg.timeout_min),
        "nodes": int(lcfg.nodes),
        "tasks_per_node": int(lcfg.tasks_per_node),
        "cpus_per_task": int(lcfg.cpus_per_task),
        "slurm_signal_delay_s": int(lcfg.signal_delay_s),
    }
    if lcfg.partition:
        params["slurm_partition"] = str(lcfg.partition)
    executor.update_parameters(**params)
    return executor


def _submit(executor, job: StageJob):
    try:
        return executor.submit(job)
    except Exception as err:  # sbatch missing, no controller, bad partition
        raise MPQError(f"could not submit the Slurm job ({type(err).__name__}: {str(err).strip().splitlines()[-1]}); "
                       f"is the cluster reachable (sinfo)?") from None


def _wait(cfg, jobs: list, where: Path) -> list[dict[str, Any]]:
    """Wait for every job (bounded by `launcher.max_wait_min`); rank 0's result of each, or one
    error naming the first job that was cancelled or failed."""
    lcfg = cfg.launcher
    minutes = lcfg.max_wait_min or (2 * int(lcfg.timeout_min) + 5) * max(1, len(jobs))  # the jobs may run one by one
    deadline = time.time() + 60 * float(minutes)
    while not all(job.done() for job in jobs):
        if time.time() > deadline:
            waiting = [job.job_id for job in jobs if not job.done()]
            raise MPQError(f"Slurm job(s) {', '.join(waiting)} have not finished within launcher.max_wait_min")
        time.sleep(float(lcfg.poll_seconds))
    results = []
    for job in jobs:
        try:
            results.append(job.results()[0])  # rank 0's return value: present only if the stage finished
        except Exception:
            state = str(job.state)
            if state.startswith("CANCELLED"):
                raise MPQError(f"Slurm job {job.job_id} was cancelled ({state})") from None
            tail = [line for line in (job.stderr() or "").strip().splitlines() if line.strip()][-2:]
            raise MPQError(f"Slurm job {job.job_id} ended {state}: {' | '.join(tail) or 'see ' + str(where)}") from None
    return results


def submit_stage(cfg, stage: str, overrides: list[str], run_dir: Path, entry: Callable[[list[str]], int]) -> None:
    """Submit `stage` as a Slurm job that runs `entry(argv)` (the `mpq` command's `main`); with
    `launcher.wait`, wait and check how it ended."""
    run_dir = Path(run_dir).resolve()
    job = _submit(_executor(cfg, stage, run_dir / "slurm"), StageJob(stage, overrides, str(run_dir), entry))
    print(f"mpq {stage}: submitted Slurm job {job.job_id} (logs in {run_dir / 'slurm'})", flush=True)
    if not cfg.launcher.wait:
        return
    result = _wait(cfg, [job], run_dir / "slurm")[0]
    print(f"mpq {stage}: Slurm job {job.job_id} finished with status {result.get('status')}; "
          f"result in {run_dir / 'result.json'}", file=sys.stderr)


def submit_runs(cfg, stage: str, overrides: list[str], runs: list[tuple[list[str], Path]],
                entry: Callable[[list[str]], int]) -> None:
    """One Slurm job per run of a stage that dispatches its own runs (`mpq study`): each job runs
    `mpq <stage> <overrides> <run overrides>` in its run folder; all are submitted, then waited for."""
    jobs = []
    for extra, run_dir in runs:
        run_dir = Path(run_dir).resolve()
        job = _submit(_executor(cfg, stage, run_dir), StageJob(stage, [*overrides, *extra], str(run_dir), entry))
        print(f"mpq {stage}: submitted Slurm job {job.job_id} ({' '.join(extra)}; logs in {run_dir})", flush=True)
        jobs.append(job)
    _wait(cfg, jobs, Path(runs[0][1]).parent if runs else Path("."))
