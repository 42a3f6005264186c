"""`python -m tests.tune.sweep_main RUN_DIR CHECKPOINT [overrides...]`: a sweep in its own process
(what `mpq sweep` runs), for tests that interrupt it."""

import sys
from pathlib import Path

from framework.tune.sweep import run_sweep
from tests.tune.conftest import sweep_config

if __name__ == "__main__":
    run_sweep(sweep_config(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:]))
