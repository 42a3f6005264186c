"""The sweep's Aim repository: created before the trials start, their runs indexed after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.errors import MPQError
from framework.tune.plan import Plan


def aim_repo(plan: Plan) -> str | None:
    """The trials' local Aim repository, or None (tracking off, or a remote server)."""
    tracking = plan.base["tracking"]
    repo = str(tracking["repo"])
    return None if not tracking["enabled"] or repo.startswith("aim://") else repo


def create_aim_repo(plan: Plan) -> None:
    """Create the Aim repository before trials start: two trials creating it at once race (one
    sees a half-made repository and fails)."""
    repo = aim_repo(plan)
    if repo is None:
        return
    from aim import Repo

    Path(repo).mkdir(parents=True, exist_ok=True)
    try:
        Repo.from_path(repo, init=True)
    except Exception as err:
        raise MPQError(f"cannot open the Aim repository {repo} ({type(err).__name__}: {err}); set tracking.repo to a "
                       f"writable folder or aim://host:port, or tracking.enabled=false") from None


def index_aim_runs(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """Make every trial's Aim run visible to Aim's SDK (trials index their own on close, but a
    stopped or killed trial may not have; this driver indexes them one after another)."""
    repo = aim_repo(plan)
    if repo is None:
        return
    from framework.track.aim_tracker import index_run

    for row in rows:
        if row["aim_run"]:
            index_run(repo, row["aim_run"])
