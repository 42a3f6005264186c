"""The process group every distributed stage runs in, and the few collectives the loops need.

`open_process_group` always creates a group, also for one process (a world of one on an in-memory
store), so the DeepSpeed engine and the training loop have one code path. Backend: `gloo` on the
CPU, `nccl` on CUDA (`dist.backend=auto`). With several processes it rendezvous through the
torchrun variables (`env://`), which :func:`framework.dist.ranks.export_slurm_ranks` also fills in
inside Slurm tasks.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from framework.dist.ranks import Ranks, export_slurm_ranks
from framework.errors import MPQError

log = logging.getLogger(__name__)


def backend_for(device: torch.device, requested: str = "auto") -> str:
    if requested and requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def open_process_group(device: torch.device, backend: str = "auto", timeout_min: float = 30) -> Iterator[Ranks]:
    """Join (or, for one process, create) the process group; later stages of the same process
    (`mpq pipeline`) reuse it, since DeepSpeed keeps references to it. It ends with the process."""
    ranks = export_slurm_ranks()
    backend = backend_for(device, backend)
    owned = not torch_dist.is_initialized()
    if owned:
        timeout = timedelta(minutes=float(timeout_min))
        try:
            if ranks.distributed:
                torch_dist.init_process_group(backend, init_method="env://", rank=ranks.rank,
                                              world_size=ranks.world_size, timeout=timeout)
            else:
                torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            atexit.register(_destroy)
        except (RuntimeError, ValueError) as err:
            raise MPQError(
                f"could not join the process group (rank {ranks.rank} of {ranks.world_size}, "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, backend {backend}): "
                f"{str(err).splitlines()[0]}"
            ) from None
    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    set_local_rank = "LOCAL_RANK" not in os.environ  # DeepSpeed reads it, also for one process
    os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
    try:
        yield ranks
    finally:
        if set_local_rank:
            os.environ.pop("LOCAL_RANK", None)


def _destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum each float over the ranks (a no-op for one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_mean(values: list[float], device: torch.device | None = None) -> list[float]:
    """Average each float over the ranks."""
    n = world_size()
    return [v / n for v in all_reduce_sum(values, device)]



#: what gloo, NCCL and torch's c10d say when a peer process of the group is gone
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket closed",
              "Read error", "Write error", "NCCL communicator was aborted", "remote process exited",
              "Connection refused", "failed to recv", "Timed out")


def lost_peer_reason(err: BaseException) -> str | None:
    """What a collective that failed because another process of the group died or vanished said
    (the marker, e.g. "Connection closed by peer"); None for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err).lower()
    return next((marker for marker in _LOST_PEER if marker.lower() in text), None)
