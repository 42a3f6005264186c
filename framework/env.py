"""Process-wide environment defaults: telemetry off and loopback-only servers.

Set before Ray, Aim or DeepSpeed are imported so that none of them reports usage over the network.
Users may still override any of these variables explicitly.
"""

import logging
import os
import sys

_DEFAULTS = {
    # DeepSpeed JIT-builds a small C++ op on the CPU (once); keep the build beside this venv, since
    # a cache shared by name between venvs is rebuilt whenever another venv uses it
    "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions"),
    "RAY_USAGE_STATS_ENABLED": "0",
    "AIM_UI_TELEMETRY_ENABLED": "0",
    "AIM_TELEMETRY_ENABLED": "0",
    "TQDM_MININTERVAL": "1",
}


def configure_environment() -> None:
    """Apply the defaults above without overwriting anything the user already set."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    # torch's extension builder (DeepSpeed's ops, inductor) warns "No CUDA runtime is found" on
    # every CPU machine; it says nothing a user can act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
