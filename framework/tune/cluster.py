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
#: the set-up hook of the Ray workers of `launcher=ray`: no prefetched search (every Ray Train
#: process, the controller's included, would pay ~5 s of CPU importing it)
TRAIN_WORKER_ENV = {"worker_process_setup_hook": "framework.tune.cluster.quiet_ray_train_logs"}

#: Ray Train's loggers that repeat, every second or once with a traceback, that the state API or the
#: autoscaler is missing: neither exists on a cluster started without Ray's dashboard (`ray[tune]`
#: installs none), and Ray Train runs without them
_QUIET_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                      "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")


def quiet_ray_train_logs() -> None:
    """Ray's worker set-up hook: drop all but critical records of :data:`_QUIET_RAY_LOGGERS` (a
    filter, not a level: Ray Train's logging set-up resets the levels of its loggers)."""
    for name in _QUIET_RAY_LOGGERS:
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.CRITICAL)


def _start_hint(key: str) -> str:
    return (f"start one (`ray start --head --node-ip-address=<ip> --port=6379`, or slurm/ray_sweep.sbatch) or drop {key} "
            f"to run Ray in this process")


def _host_port(address: str, key: str = "tune.address") -> tuple[str, int]:
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise MPQError(f"{key}={address} is invalid: expected auto, host:port or ray://host:port")
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


def check_reachable(address: str, key: str = "tune.address") -> str:
    """The concrete address `address` (the value of the config key `key`) stands for, after
    checking its head port answers."""
    target = address
    if address == "auto":
        target = _auto_address()
        if not target:
            raise MPQError(f"{key}=auto: no running Ray cluster found (RAY_ADDRESS is unset and no `ray start` "
                           f"on this machine); {_start_hint(key)}")
    if target.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (Ray Client's transport)
        except ImportError:
            raise MPQError(f"{key}={address}: Ray Client is not installed (pip install 'ray[client]'); or run "
                           f"mpq sweep on a node of the cluster with tune.address=auto") from None
    host, port = _host_port(target, key)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise MPQError(f"{key}={address}: cannot reach a Ray cluster at {host}:{port} ({err.strerror or err}); "
                       f"{_start_hint(key)}") from None
    return target


@contextlib.contextmanager
def ray_session(tcfg: Any) -> Iterator[dict[str, Any]]:
    """Ray connected as `tcfg` (the config's `tune` node) says, for the duration of the block.

    Yields what was connected to (`mode`: embedded, cluster or existing; the cluster's resources).
    """
    with ray_connection(tcfg.address, tcfg.num_cpus, tcfg.num_gpus) as info:
        yield info


def loopback(address: str | None) -> bool:
    """True for a private Ray (no address) or a cluster whose head is on this machine's loopback."""
    if not address or address == "local":
        return True
    target = _auto_address() if address == "auto" else address
    return bool(target) and _host_port(target)[0] in ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def ray_connection(address: str | None, num_cpus: int | None = None, num_gpus: float | None = None,
                   key: str = "tune.address", env_vars: dict[str, str] | None = None,
                   worker_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Ray in this process (`address` null: a private instance on 127.0.0.1 with `num_cpus` /
    `num_gpus`, stopped afterwards) or joined to the cluster at `address` (left running), for the
    duration of the block; `env_vars` go to every Ray worker of this job, whose set-up hook is
    `worker_env`'s (default: the sweep's, :data:`WORKER_ENV`). Errors name `key`."""
    import ray

    if ray.is_initialized():
        yield {"mode": "existing", "resources": ray.cluster_resources()}
        return
    runtime_env = {**(worker_env or WORKER_ENV), **({"env_vars": dict(env_vars)} if env_vars else {})}
    if not address or address == "local":
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, runtime_env=runtime_env)
        mode = "embedded"
    else:
        target = check_reachable(str(address), key)
        try:
            ray.init(address=str(address), logging_level=logging.WARNING, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise MPQError(f"{key}={address}: cannot join the Ray cluster at {target} ({err}); if it uses token "
                           f"authentication, set RAY_AUTH_MODE=token (the token is ~/.ray/auth_token); {_start_hint(key)}") from None
        mode = "cluster"
    try:
        yield {"mode": mode, "resources": ray.cluster_resources()}
    finally:
        ray.shutdown()
