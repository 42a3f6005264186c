"""Where a sweep's trials run: Ray in this process on 127.0.0.1, or a running Ray cluster.

- `tune.address` null (the default): `ray.init(address="local")` starts a private Ray instance on
  127.0.0.1 with `tune.num_cpus` / `tune.num_gpus`, no dashboard, usage statistics off
  (framework/env.py sets RAY_USAGE_STATS_ENABLED=0 on import), and stops it when the sweep ends.
- `tune.address=auto`: join the cluster `RAY_ADDRESS` names, or the one `ray start` left on this
  machine (what slurm/ray_sweep.sbatch does); `host:port` joins that head; `ray://host:port`
  connects through Ray Client (needs the `ray[client]` extra). The cluster is left running. A
  cluster with token authentication needs `RAY_AUTH_MODE=token` in the environment (Ray sends
  the token only to clusters it found itself, not to an address it was given).

Before joining, the head's port is probed, so an unreachable address is one error line in a few
seconds rather than Ray's minutes of retries. An already connected Ray (a test fixture, a
notebook) is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from framework.errors import MPQError

PROBE_TIMEOUT_S = 5.0
#: Ray workers import the search when they start, while the driver is still setting Tune up, so the
#: first trials do not pay for importing torch and the framework after they were scheduled (~3 s)
WORKER_ENV = {"worker_process_setup_hook": "framework.tune.trial.prepare_worker"}
_START_HINT = "start one (`ray start --head --node-ip-address=<ip> --port=6379`, or slurm/ray_sweep.sbatch) or drop tune.address to run Ray in this process"


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise MPQError(f"tune.address={address} is invalid: expected auto, host:port or ray://host:port")
    return host.strip("[]"), int(port)


def _auto_address() -> str | None:
    """What `address="auto"` would join: RAY_ADDRESS, else the cluster `ray start` recorded here."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:  # Ray's record of the last `ray start` on this machine (not a public API; best effort)
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:
        return None


def check_reachable(address: str) -> str:
    """The concrete address `address` stands for, after checking its head port answers."""
    target = address
    if address == "auto":
        target = _auto_address()
        if not target:
            raise MPQError(f"tune.address=auto: no running Ray cluster found (RAY_ADDRESS is unset and no `ray start` "
                           f"on this machine); {_START_HINT}")
    if target.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (Ray Client's transport)
        except ImportError:
            raise MPQError(f"tune.address={address}: Ray Client is not installed (pip install 'ray[client]'); or run "
                           f"mpq sweep on a node of the cluster with tune.address=auto") from None
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise MPQError(f"tune.address={address}: cannot reach a Ray cluster at {host}:{port} ({err.strerror or err}); "
                       f"{_START_HINT}") from None
    return target


@contextlib.contextmanager
def ray_session(tcfg: Any) -> Iterator[dict[str, Any]]:
    """Ray connected as `tcfg` (the config's `tune` node) says, for the duration of the block.

    Yields what was connected to (`mode`: embedded, cluster or existing; the cluster's resources).
    """
    import ray

    if ray.is_initialized():
        yield {"mode": "existing", "resources": ray.cluster_resources()}
        return
    address = tcfg.address
    if not address or address == "local":
        ray.init(address="local", num_cpus=tcfg.num_cpus, num_gpus=tcfg.num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, runtime_env=WORKER_ENV)
        mode = "embedded"
    else:
        target = check_reachable(str(address))
        try:
            ray.init(address=str(address), logging_level=logging.WARNING, runtime_env=WORKER_ENV)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise MPQError(f"tune.address={address}: cannot join the Ray cluster at {target} ({err}); if it uses token "
                           f"authentication, set RAY_AUTH_MODE=token (the token is ~/.ray/auth_token); {_START_HINT}") from None
        mode = "cluster"
    try:
        yield {"mode": mode, "resources": ray.cluster_resources()}
    finally:
        ray.shutdown()
