"""`launcher`: where the stage runs, by `name`: `local` (this process) or `slurm` (a submitit job;
its time limit, nodes, tasks and CPUs >= 1, the requeue signal's delay and the wait's polling)."""

from typing import Literal

from framework.config.types import Flag, Schema, Text, number, whole


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


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher}
