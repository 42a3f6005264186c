"""Where the project keeps things when the config does not say otherwise."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SETUP_COMMAND = "make setup (or bash scripts/setup.sh)"


def default_data_root() -> Path:
    """`$MPQ_DATA_ROOT` if set, else `data/` at the repository root (filled by the set-up script)."""
    return Path(os.environ.get("MPQ_DATA_ROOT", REPO_ROOT / "data"))
