"""One trial of a sweep: an `mpq search` in its own folder, reporting to Ray Tune every epoch.

The trainable runs in a Ray worker (another process, maybe another machine), so everything it needs
travels in a picklable :class:`TrialContext` with absolute paths. Per trial, in
`<sweep run_dir>/trials/<key>/`:

- the search's own files: `policy.json`, `result.json`, `checkpoints/last`, figures;
- `attempts.jsonl`: one line per start of the trial (`run`, `resume` from a checkpoint step, or
  `reuse` of a finished search), with the process id and host, so retries are visible;
- `aim_run`: the trial's Aim run hash, so a retried or restored attempt continues the same Aim run;
- `search.log`: the search's log and progress bars (kept off the sweep's console, where Tune
  shows the trials' reports).

Reports: after every epoch but the last, `{"epoch", "proxy_top1", "expected_bitops", "final": False}`
(what ASHA decides on); once the policy is written, the final report with the policy's `bitops`
and `"final": True`. The last epoch is reported only then, because ASHA stops a trial that reaches
`max_t` and the policy must exist before that. A search that already finished (a restored sweep,
or an identical trial of an earlier sweep in the same folder) is not run again: its result is
reported. Retries resume: the search runs with `resume=true` in the trial's folder, so a crashed
or killed attempt continues from its last checkpoint. A user error in a trial (:class:`MPQError`)
would fail the same way again, so it is reported as the trial's `error` instead of being retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from framework.errors import MPQError
from framework.results import finished_result
from framework.tune.plan import TrialSpec, trial_config

ATTEMPTS = "attempts.jsonl"
AIM_RUN = "aim_run"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep shares (picklable, absolute paths)."""

    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    sweep_dir: str
    experiment: str
    threads: int = 1

    def trial_dir(self, key: str) -> Path:
        return Path(self.sweep_dir) / "trials" / key

    def config(self, trial: TrialSpec) -> DictConfig:
        """The trial's `mpq search` config: its own folder, resumable, tracked under the sweep's experiment."""
        trial_dir = self.trial_dir(trial.key)
        cfg = trial_config(self.base, self.methods, trial.overrides)
        with open_dict(cfg):
            cfg.run_dir = str(trial_dir)
            cfg.resume = True
            cfg.threads = self.threads
            cfg.experiment_name = self.experiment
            cfg.tracking.run_name = f"search {trial.key}"
            cfg.tracking.tags = ["sweep"]
            cfg.tracking.run_hash_file = str(trial_dir / AIM_RUN)
            cfg.trial = {"key": trial.key, "index": trial.index, "sweep_dir": self.sweep_dir,
                         "overrides": [f"{k}={v}" for k, v in trial.overrides.items()]}
        return cfg


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of `run_dir/checkpoints/last`, or None without one."""
    try:
        return int(json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The trial's attempts, oldest first."""
    path = Path(run_dir) / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_attempt(run_dir: Path, action: str, from_step: int | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {"attempt": len(read_attempts(run_dir)) + 1, "action": action, "from_step": from_step, "pid": os.getpid(),
             "host": socket.gethostname(), "time": round(time.time(), 3)}
    with open(run_dir / ATTEMPTS, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def final_report(result: dict[str, Any]) -> dict[str, Any]:
    """What a finished search reports last: the proxy top-1, its expected and its policy's BitOps."""
    metrics, history = result["metrics"], result.get("history") or [{}]
    return {"epoch": int(history[-1].get("epoch", 0)), "proxy_top1": float(metrics["proxy_top1"]),
            "expected_bitops": float(metrics.get("expected_gbitops") or 0.0) * 1e9, "bitops": float(metrics["bitops"]),
            "final": True}


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Ray Tune trainable: one proxy search, `config["trial"]` being a :class:`TrialSpec` as a dict."""
    import torch
    from ray import tune

    from framework.search.loop import run_search
    from framework.train.resume import Interrupted

    trial = TrialSpec(**config["trial"])
    trial_dir = context.trial_dir(trial.key)
    torch.set_num_threads(context.threads)
    done = finished_result(trial_dir)
    if done is not None:
        _record_attempt(trial_dir, "reuse", None)
        tune.report(final_report(done))
        return
    step = checkpoint_step(trial_dir)
    _record_attempt(trial_dir, "resume" if step else "run", step)

    def on_epoch(entry: dict[str, Any]) -> None:
        if entry["step"] < entry["total_steps"]:  # the last epoch is reported with the policy
            tune.report({"epoch": int(entry["epoch"]), "proxy_top1": float(entry["proxy_top1"]),
                         "expected_bitops": float(entry["expected_bitops"]), "final": False})

    try:
        with _trial_log(trial_dir / "search.log"):
            run_search(context.config(trial), on_epoch=on_epoch)
    except Interrupted:
        raise
    except MPQError as err:
        tune.report({"epoch": 0, "proxy_top1": float("nan"), "error": str(err), "final": True})
        return
    tune.report(final_report(finished_result(trial_dir)))


@contextlib.contextmanager
def _trial_log(path: Path) -> Iterator[None]:
    """The search's log records (INFO) and its stderr (progress bars) into `path` while it runs.

    A Ray worker runs one trial at a time, so redirecting the process's `sys.stderr` is safe."""
    handle = open(path, "a", buffering=1)
    handler = logging.StreamHandler(handle)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("framework")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(handle):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handle.close()


def prepare_worker() -> None:
    """Ray's worker set-up hook for sweeps: quiet Ray Train's reports of the missing dashboard, and
    import the search while the worker waits for its first trial."""
    from framework.tune.cluster import quiet_ray_train_logs

    quiet_ray_train_logs()
    import framework.search.loop  # noqa: F401
