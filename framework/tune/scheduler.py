"""The sweep's trial scheduler: Ray Tune's ASHA on the epochs, recording whom it stopped.

ASHA (asynchronous successive halving, Li et al., MLSys 2020) stops a trial at a rung (epoch
`grace_period * reduction_factor**k`) when its proxy top-1 is below the `1 - 1/reduction_factor`
quantile of the trials that reached that rung before it. Ray Tune implements it; this subclass
only writes each decision to a file, because once a Tune run ends, a trial ASHA stopped and a
trial an interruption cut short look the same (Tune marks both TERMINATED), and the sweep must
tell "stopped as weak" from "resume me".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


class RecordingASHA(ASHAScheduler):
    """`ASHAScheduler` on `time_attr="epoch"`, maximising `proxy_top1`, that appends every early
    stop to `record` (JSON lines: trial key, epoch, proxy top-1). A stop on a trial's final
    report (its policy already written) is not an early stop and is not recorded."""

    def __init__(self, record: str, **kwargs: Any):
        super().__init__(time_attr="epoch", metric="proxy_top1", mode="max", **kwargs)
        self.record = record

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and not result.get("final"):
            entry = {"key": trial.config["trial"]["key"], "epoch": result.get("epoch"), "proxy_top1": result.get("proxy_top1")}
            Path(self.record).parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return action


def build_scheduler(name: str, record: Path, grace_period: int, reduction_factor: float, max_t: int) -> TrialScheduler:
    """`asha` (stops weak trials early, recording them in `record`) or `fifo` (runs all to the end)."""
    if name == "fifo":
        return FIFOScheduler()
    return RecordingASHA(str(record), grace_period=grace_period, reduction_factor=reduction_factor, max_t=max_t)


def stopped_early(record: Path) -> dict[str, dict[str, Any]]:
    """The trials the scheduler stopped early, by key (the last decision for each)."""
    if not Path(record).exists():
        return {}
    entries = [json.loads(line) for line in Path(record).read_text().splitlines() if line.strip()]
    return {entry["key"]: entry for entry in entries}
