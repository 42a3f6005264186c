"""One Aim run per stage run.

The run's experiment is `cfg.experiment_name`, `run["hparams"]` holds the resolved config, and every
metric carries `context={"subset": "train" | "val" | "proxy"}` so the dashboard can split them.
`tracking.repo` is a local folder (the `.aim` repository is created inside it) or a remote tracking
server `aim://host:port`, which is the safe choice when many cluster jobs track at once.
`tracking.enabled=false` gives a :class:`NullTracker` that records nothing.

Optional keys a caller may add (a sweep's trials do): `tracking.run_name` (the run's name, default
the stage), `tracking.tags` (extra tags) and `tracking.run_hash_file`, a file that keeps the run's
hash so that a retried or resumed attempt of the same run continues that Aim run instead of
opening a second one.

Aim's SDK reads runs through an index that only `aim up` or a reindex refreshes; :meth:`Tracker.close`
indexes the run it wrote, so the SDK (and `Repo.iter_runs`) sees it right after the stage ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from framework.errors import MPQError
from framework.results import config_to_dict

log = logging.getLogger(__name__)
# Aim logs every writer thread it starts at INFO; keep the console for the stage's own progress.
for _name in ("aim", "aim.sdk", "aim.sdk.reporter"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class NullTracker:
    """Tracking switched off: the same calls, nothing recorded."""

    run_hash: str | None = None
    repo: str | None = None

    def track(self, name: str, value: float, step: int | None = None, subset: str = "train", **context: Any) -> None:
        pass

    def set(self, key: str, value: Any) -> None:
        pass

    def track_image(self, name: str, path: str, step: int | None = None, subset: str = "train") -> None:
        pass

    def close(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"enabled": False}


class Tracker(NullTracker):
    """An open Aim run."""

    def __init__(self, repo: str, experiment: str, run_name: str, hparams: dict[str, Any], tags: list[str],
                 run_hash_file: str | None = None):
        from aim import Run

        self.repo = repo
        self._local = not repo.startswith("aim://")
        try:
            if self._local:
                Path(repo).mkdir(parents=True, exist_ok=True)
            options = dict(repo=repo, experiment=experiment, log_system_params=False, capture_terminal_logs=False,
                           system_tracking_interval=None)
            previous = _previous_run(repo, run_hash_file)
            try:
                self._run = Run(run_hash=previous, **options)
            except Exception as err:  # gone, or still held by a live process: start a new run
                if previous is None:
                    raise
                log.warning("cannot continue Aim run %s (%s); starting a new run", previous, err)
                self._run = Run(**options)
        except Exception as err:
            raise MPQError(
                f"cannot open the Aim repository {repo} ({type(err).__name__}: {err}); "
                f"set tracking.repo to a writable folder or aim://host:port, or tracking.enabled=false"
            ) from None
        self._run.name = run_name
        for tag in tags:
            self._run.add_tag(tag)
        self._run["hparams"] = hparams
        self.run_hash: str | None = self._run.hash
        if run_hash_file:
            from framework.results import atomic_write_text

            atomic_write_text(Path(run_hash_file), self.run_hash + "\n")

    def track(self, name: str, value: float, step: int | None = None, subset: str = "train", **context: Any) -> None:
        self._run.track(float(value), name=name, step=step, context={"subset": subset, **context})

    def set(self, key: str, value: Any) -> None:
        self._run[key] = value

    def track_image(self, name: str, path: str, step: int | None = None, subset: str = "train") -> None:
        """A PNG (a policy plot, a loss curve) shown in Aim's Images explorer."""
        from aim import Image as AimImage
        from PIL import Image

        with Image.open(path) as image:
            self._run.track(AimImage(image.convert("RGB")), name=name, step=step, context={"subset": subset})

    def close(self) -> None:
        if self._run is None:
            return
        self._run.close()
        self._run = None
        if self._local:
            index_run(self.repo, self.run_hash)

    def info(self) -> dict[str, Any]:
        return {"enabled": True, "repo": str(self.repo), "run_hash": self.run_hash}


def index_run(repo: str | Path, run_hash: str) -> None:
    """Make a finished run visible to Aim's SDK without `aim up` (Aim reads runs through an index)."""
    try:
        from aim import Repo
        from aim.sdk.index_manager import RepoIndexManager

        RepoIndexManager.get_index_manager(Repo.from_path(str(repo))).index(run_hash)
    except Exception as err:  # the run is on disk either way; `aim up` indexes it too
        log.warning("could not index Aim run %s in %s: %s", run_hash, repo, err)


def open_tracker(cfg: Any, stage: str, main: bool = True) -> NullTracker:
    """The tracker for one stage run, as `cfg.tracking` says; ranks other than 0 (`main=False`) track nothing."""
    tracking = cfg.tracking
    if not main or not tracking.enabled:
        return NullTracker()
    hparams = config_to_dict(cfg) or {}
    return Tracker(repo=str(tracking.repo), experiment=str(cfg.experiment_name), run_name=str(tracking.run_name or stage),
                   hparams=hparams, tags=[stage, *tracking.tags], run_hash_file=tracking.run_hash_file)


def _previous_run(repo: str, run_hash_file: str | None) -> str | None:
    """The run recorded in `run_hash_file` by an earlier attempt of the same run, if the repository
    still holds it (a sweep's retried or restored trial continues its own Aim run)."""
    if not run_hash_file or not Path(run_hash_file).exists():
        return None
    run_hash = Path(run_hash_file).read_text().strip()
    if not run_hash or repo.startswith("aim://"):
        return run_hash or None
    try:
        from aim import Repo

        return run_hash if Repo.from_path(repo).run_exists(run_hash) else None
    except Exception:  # no repository there any more: a new run
        return None
