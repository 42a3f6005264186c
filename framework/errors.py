"""The one exception type users see.

Every user-facing failure (a missing dataset, an unknown model, a corrupt checkpoint, a bad
value) raises :class:`MPQError` with one sentence that names the thing and says what
would fix it. The `mpq` command prints that sentence on one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class MPQError(Exception):
    """A user-facing error: one line naming what is wrong and how to fix it.

    `details` (optional) are recorded beside the message in the run's `result.json` (for example
    the measurements that made a check fail)."""

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.details = dict(details or {})

