"""`dist.nproc=N`: start N local processes through torch's elastic launcher (what `torchrun` runs).

The `mpq` process composes the config, checks it, and becomes the launcher: it starts N workers
running the same `mpq <stage> ...` command with the run directory fixed (`hydra.run.dir`), a c10d
rendezvous on 127.0.0.1 at a free port, and gloo bound to the loopback interface. Each worker
learns its rank from torchrun's variables (:mod:`framework.dist.ranks`). SIGTERM to the launcher
reaches every worker, which saves `checkpoints/last` and stops; the launcher then reports what
rank 0 wrote to `result.json`. Multi-node runs start torchrun on every node themselves (see the
sbatch templates in `slurm/`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from framework.dist.ranks import launched_ranks


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def should_spawn(cfg) -> bool:
    """True when this process must start `dist.nproc` workers (it is not one of them already)."""
    return int(cfg.dist.nproc or 1) > 1 and not launched_ranks()


def worker_args(stage: str, overrides: list[str], run_dir: Path) -> list[str]:
    """The workers' `mpq` arguments: the user's overrides, the fixed run dir, no second .hydra/."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "hydra.output_subdir")]
    return ["-m", "launchers.cli", stage, *kept, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def spawn_local(cfg, stage: str, overrides: list[str], run_dir: Path) -> str | None:
    """Run the stage on `dist.nproc` local workers and wait. Returns None when every worker
    succeeded, else a one-line description of the failure (or of the signal that stopped them)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = int(cfg.dist.nproc)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # the launcher reports a failed or stopped worker in its own one line (launchers.cli): torch
    # elastic's log lines about the same ("Sending process ... closing signal", "failed (exitcode")
    # would only repeat it
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(os.environ["LOGLEVEL"])
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mpq-{stage}-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", local_addr="127.0.0.1",
        max_restarts=0, monitor_interval=0.5,
        # after SIGTERM the workers finish their step and save every rank's part of checkpoints/last:
        # give them time (the default, 30 s, can cut a large checkpoint short on a busy machine)
        shutdown_timeout=300,
    )
    print(f"mpq {stage}: starting {nproc} processes (torch elastic, gloo/nccl on 127.0.0.1)", file=sys.stderr, flush=True)
    try:
        elastic_launch(config, sys.executable)(*worker_args(stage, overrides, Path(run_dir).resolve()))
    except ChildFailedError as err:
        return describe_failure(err.failures, nproc, run_dir)
    except SignalException as err:
        return f"stopped by {err.sigval.name}"
    return None


def describe_failure(failures: dict, nproc: int, run_dir: Path) -> str:
    """One line for the launcher's failed workers (`failures`: rank -> torch elastic's ProcessFailure).

    The cause comes first: a worker the launcher did not stop itself (any exit but SIGTERM, which the
    launcher sends to the survivors once one worker is gone), then the earliest. A worker killed by
    a signal in a multi-process run (the OOM killer, a lost node, `kill -9`) is described as the
    survivors describe it when they see it first (:func:`lost_peer_message`): the survivor may be
    stopped before it gets to write its own line.
    """
    rank, failure = min(failures.items(),
                        key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]))
    if failure.exitcode < 0 and nproc > 1:
        return lost_peer_message(nproc, f"rank {rank} was killed by {failure.signal_name()}", run_dir)
    return f"process rank {rank} exited with code {failure.exitcode}"


def lost_peer_message(world_size: int, seen: str, run_dir: Path) -> str:
    """The one line of a run one of whose processes died mid-run: what was seen, the last
    checkpoint (whatever was committed before), and how to continue."""
    last = Path(run_dir) / "checkpoints" / "last"
    try:
        kept = f"the last checkpoint {last} (step {json.loads((last / 'meta.json').read_text())['step']}) is intact"
    except (OSError, ValueError, KeyError):
        kept = "no checkpoint was written yet"
    return (f"another process of this {world_size}-process run died ({seen}); {kept}; "
            "run the same command with resume=true to continue")
