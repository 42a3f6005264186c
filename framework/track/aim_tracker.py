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

Many jobs at once (a Slurm array, a multirun) against one local repository: Aim creates a new
repository's files on first open with no lock of its own, and a second process opening it in the
middle sees an "out of date" repository and fails. Creation, first open and indexing therefore run
under an exclusive `fcntl` lock on `<repo>/.mpq-aim.lock`, with :data:`OPEN_ATTEMPTS` attempts
`OPEN_BACKOFF_S`, 2x, 4x ... seconds apart (a lock held longer than `LOCK_WAIT_S`, a folder that
is not writable or a path that is a file is not retried); after the last, one clear error before any compute.

A failure *after* the run has started (a remote server gone, a full disk under the repository) must
not end the training: the first one logs one warning, switches tracking off for the rest of the run,
and :meth:`Tracker.info` (which goes into `result.json`) says `"enabled": false, "failed": "..."`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from framework.errors import MPQError
from framework.results import config_to_dict, provenance

log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 5
OPEN_BACKOFF_S = 0.5
LOCK_NAME = ".mpq-aim.lock"
LOCK_WAIT_S = 60.0
# errors that another attempt cannot cure (Aim's own "out of date" RuntimeError of a half-created
# repository, and anything else, is retried)
_NOT_TRANSIENT = (PermissionError, FileExistsError, NotADirectoryError, TimeoutError)
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
        self.repo = repo
        self._local = not repo.startswith("aim://")
        self._failed: str | None = None
        options = dict(repo=repo, experiment=experiment, log_system_params=False, capture_terminal_logs=False,
                       system_tracking_interval=None)
        error: Exception | None = None
        self._run = None
        for attempt in range(OPEN_ATTEMPTS):
            try:
                with _repo_lock(repo, wait_s=LOCK_WAIT_S) as locked:
                    if not locked:
                        raise TimeoutError(f"{Path(repo) / LOCK_NAME} held by another process for {LOCK_WAIT_S:.0f} s")
                    run = _open_run(repo, options, run_hash_file)
                    run.name = run_name  # the name, tags and hparams go to the repository's shared
                    for tag in tags:     # metadata database: written under the lock as well
                        run.add_tag(tag)
                    run["hparams"] = hparams
                    self._run = run
                break
            except Exception as err:  # noqa: BLE001 - any failure to open is retried, then reported
                error = err
                if isinstance(err, _NOT_TRANSIENT) or attempt + 1 == OPEN_ATTEMPTS:
                    break  # waiting will not make a file a folder, or a folder writable
                delay = OPEN_BACKOFF_S * 2**attempt
                log.debug("opening Aim repository %s failed (%s); retrying in %.1f s", repo, err, delay)
                time.sleep(delay)
        if self._run is None:
            raise MPQError(
                f"cannot open the Aim repository {repo} ({type(error).__name__}: {error}) after {attempt + 1} "
                f"attempt(s); set tracking.repo to a writable folder or aim://host:port, or tracking.enabled=false"
            ) from None
        self.run_hash: str | None = self._run.hash
        if run_hash_file:
            from framework.results import atomic_write_text

            atomic_write_text(Path(run_hash_file), self.run_hash + "\n")

    def _guarded(self, call: Callable[[], None]) -> None:
        """Run one tracking call; the first failure switches tracking off with one warning line."""
        if self._run is None or self._failed is not None:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - tracking must never end the training
            self._failed = f"{type(err).__name__}: {err}"
            log.warning("tracking to %s failed (%s); tracking is off for the rest of this run", self.repo, self._failed)
            with contextlib.suppress(Exception):
                self._run.close()
            self._run = None

    def track(self, name: str, value: float, step: int | None = None, subset: str = "train", **context: Any) -> None:
        self._guarded(lambda: self._run.track(float(value), name=name, step=step, context={"subset": subset, **context}))

    def set(self, key: str, value: Any) -> None:
        self._guarded(lambda: self._run.__setitem__(key, value))

    def track_image(self, name: str, path: str, step: int | None = None, subset: str = "train") -> None:
        """A PNG (a policy plot, a loss curve) shown in Aim's Images explorer."""

        def _track() -> None:
            from aim import Image as AimImage
            from PIL import Image

            with Image.open(path) as image:
                self._run.track(AimImage(image.convert("RGB")), name=name, step=step, context={"subset": subset})

        self._guarded(_track)

    def close(self) -> None:
        if self._run is None:
            return
        self._guarded(self._run.close)
        if self._failed is not None:
            return
        self._run = None
        if self._local:
            with _repo_lock(self.repo, wait_s=LOCK_WAIT_S) as locked:
                if locked:
                    index_run(self.repo, self.run_hash)

    def info(self) -> dict[str, Any]:
        if self._failed is not None:
            return {"enabled": False, "repo": str(self.repo), "run_hash": self.run_hash, "failed": self._failed}
        return {"enabled": True, "repo": str(self.repo), "run_hash": self.run_hash}


def _open_run(repo: str, options: dict[str, Any], run_hash_file: str | None) -> Any:
    """The Aim run: the one an earlier attempt of the same run recorded, else a new one."""
    from aim import Run

    previous = _previous_run(repo, run_hash_file)
    try:
        return Run(run_hash=previous, **options)
    except Exception as err:  # gone, or still held by a live process: start a new run
        if previous is None:
            raise
        log.warning("cannot continue Aim run %s (%s); starting a new run", previous, err)
        return Run(**options)


@contextlib.contextmanager
def _repo_lock(repo: str, wait_s: float | None = None) -> Iterator[bool]:
    """An exclusive lock on `<repo>/.mpq-aim.lock` (a local repository; a remote one needs none).

    Yields whether the lock is held: with `wait_s`, gives up after that many seconds (yields False)
    rather than blocking forever behind a stuck process.
    """
    if repo.startswith("aim://"):
        yield True
        return
    Path(repo).mkdir(parents=True, exist_ok=True)
    with open(Path(repo) / LOCK_NAME, "a") as handle:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("Aim repository %s stayed locked for %.0f s; its index is left to `aim up`", repo, wait_s)
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    hparams = {**(config_to_dict(cfg) or {}), **provenance()}  # the config, and the kernels that ran
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
