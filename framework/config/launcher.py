"""`launcher`: where the stage runs, by `name`: `local` (this process), `slurm` (a submitit job;
its time limit, nodes, tasks and CPUs >= 1, the requeue signal's delay and the wait's polling) or
`ray` (Ray Train workers on a Ray cluster: its address, resources per worker, placement, restarts)."""

from typing import Literal

from framework.config.types import Flag, Schema, Text, number, one_of, whole


class LocalLauncher(Schema):
    """`launcher=local`: the stage runs in this process."""

    name: Literal["local"]


class SlurmLauncher(Schema):
    """`launcher=slurm`: the stage is a Slurm job (one task per rank)."""

    name: Literal["slurm"]
    partition: Text | None
    timeout_min: whole(1)
    nodes: whole(1)
    tasks_per_node: whole(1)
    cpus_per_task: whole(1)
    signal_delay_s: whole(0)
    max_requeues: whole(0)
    wait: Flag
    poll_seconds: number(0, strict=True)
    max_wait_min: number(0, strict=True) | None


PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class RayLauncher(Schema):
    """`launcher=ray`: the stage runs as a Ray Train TorchTrainer of `dist.nproc` workers."""

    name: Literal["ray"]
    address: Text | None
    num_cpus: whole(1) | None
    cpus_per_worker: number(0)
    gpus_per_worker: number(0)
    placement_strategy: one_of(PLACEMENTS)
    workers_per_node: whole(1) | None
    max_failures: whole(0)
    storage_check: Flag


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher, "ray": RayLauncher}
