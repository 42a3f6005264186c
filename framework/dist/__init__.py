"""Distributed training: who is which rank, the process group, the DeepSpeed engine, local launches.

- :mod:`framework.dist.ranks`: rank and world size from Ray Train's context (`launcher=ray`),
  torchrun's or Slurm's variables.
- :mod:`framework.dist.process_group`: the process group (gloo on the CPU, NCCL on CUDA) and the
  few collectives the training loop needs.
- :mod:`framework.dist.engine`: the DeepSpeed engine (ZeRO stage, micro-batch, accumulation,
  precision) around a torch optimizer.
- :mod:`framework.dist.launch`: `dist.nproc=N` starts N local processes through torch's elastic
  launcher (torchrun).
"""

from framework.dist.ranks import Ranks, current_ranks

__all__ = ["Ranks", "current_ranks"]
