"""Which process this is: rank, world size and local rank, from the launcher's variables.

Four ways a process learns its place, checked in this order:

0. **Ray Train** (`launcher=ray`): a worker of a TorchTrainer asks its train context
   (`ray.train.get_context()`: world rank, world size, local rank); Ray Train has already created
   the process group (and set the torchrun variables, which the rest of the code reads).
1. **torchrun** (`dist.nproc=N`, or the multi-node sbatch template that starts torchrun on every
   node): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are set.
2. **Slurm tasks** (`srun` with several tasks, e.g. `launcher=slurm dist.nproc=2`): rank =
   `SLURM_PROCID`, world size = `SLURM_STEP_NUM_TASKS`, local rank = `SLURM_LOCALID`; the
   rendezvous is the first node of the step (127.0.0.1 when the step has one node) on a port
   derived from the job id, so every task computes the same address without talking.
3. Otherwise one process: rank 0 of 1.

:func:`export_slurm_ranks` writes case 2 into the torchrun variables, so the rest of the code
reads one set of names.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # single | ray | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _launched_by_torch(env: dict[str, str]) -> bool:
    return all(name in env for name in TORCH_VARS)


def _slurm_tasks(env: dict[str, str]) -> int:
    """Tasks of the current Slurm step (srun); 0 outside one (the batch script itself counts as 0)."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return 0
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


#: set in a Ray Train worker by the `launcher=ray` train function (launchers/ray_train.py), so that a
#: process that merely imported Ray is not mistaken for a worker
RAY_TRAIN_MARKER = "MPQ_RAY_TRAIN_WORKER"


def _ray_train_ranks(env: dict[str, str]) -> Ranks | None:
    """This worker's place in its Ray Train worker group, or None outside one."""
    if env.get(RAY_TRAIN_MARKER) != "1":
        return None
    import ray.train

    context = ray.train.get_context()
    return Ranks(int(context.get_world_rank()), int(context.get_world_size()), int(context.get_local_rank()), "ray")


def launched_ranks(env: dict[str, str] | None = None) -> bool:
    """True when a launcher already started several processes (torchrun, or a multi-task srun)."""
    env = dict(os.environ if env is None else env)
    return env.get(RAY_TRAIN_MARKER) == "1" or _launched_by_torch(env) or _slurm_tasks(env) > 1


def current_ranks(env: dict[str, str] | None = None) -> Ranks:
    """This process's place, from the variables described in the module docstring."""
    env = dict(os.environ if env is None else env)
    ray_ranks = _ray_train_ranks(env)
    if ray_ranks is not None:
        return ray_ranks
    if _launched_by_torch(env):
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    tasks = _slurm_tasks(env)
    if tasks > 1:
        return Ranks(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm")
    return Ranks()


def _first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list (`node[01-04],gpu7` -> `node01`), via scontrol."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def slurm_rendezvous(env: dict[str, str]) -> tuple[str, int]:
    """(address, port) every task of a Slurm step agrees on without communicating."""
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    address = "127.0.0.1" if nodes == 1 else _first_host(nodelist)
    job, step = int(env.get("SLURM_JOB_ID", 0)), int(env.get("SLURM_STEP_ID", 0) or 0)
    port = 20000 + (job * 31 + step) % 30000
    return address, port


def export_slurm_ranks() -> Ranks:
    """Inside a multi-task Slurm step, set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from
    Slurm's variables (kept if already set) and return the ranks; elsewhere, change nothing."""
    ranks = current_ranks()
    if ranks.source != "slurm":
        return ranks
    address, port = slurm_rendezvous(dict(os.environ))
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(ranks.rank), str(ranks.world_size)
    os.environ["LOCAL_RANK"] = str(ranks.local_rank)
    if address == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return ranks
