"""The one exception type users see.

Every user-facing failure (a missing dataset, an unknown model, a corrupt checkpoint, a stage that
does not exist yet) raises :class:`MPQError` with one sentence that names the thing and says what
would fix it. The `mpq` command prints that sentence on one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class MPQError(Exception):
    """A user-facing error: one line naming what is wrong and how to fix it."""


class StageNotAvailable(MPQError):
    """A stage that is registered in the command but not built in this version."""

    def __init__(self, stage: str):
        super().__init__(
            f"stage '{stage}' is not available yet in this version of mpq-framework; "
            f"the stages that run now are: prepare, pretrain, search, sweep, finetune, evaluate, cost, pipeline"
        )
        self.stage = stage
