"""`tune`: a Ray Tune sweep of proxy searches (resources, the search space, the scheduler, selection).

Checks the resources (CPUs per trial > 0, GPUs >= 0, whole counts), the scheduler (asha or fifo,
grace period >= 1, reduction factor > 1), the samples, retries and `top_k`. The space's keys and
specs are checked by framework.tune.space when the plan is made (they name other config keys).
"""

from framework.config.types import Flag, Mapping, Schema, Text, number, one_of, whole

#: framework.tune.scheduler's schedulers (that module imports Ray, so the names live here)
SCHEDULERS = ("asha", "fifo")


class SchedulerConfig(Schema):
    """`tune.scheduler`: ASHA on the epochs (or FIFO: every trial to the end)."""

    name: one_of(SCHEDULERS)
    grace_period: whole(1)
    reduction_factor: number(1, strict=True)
    max_t: whole(1) | None


class TuneConfig(Schema):
    """`tune`: where the trials run, how many, how they are stopped and selected."""

    address: Text | None
    num_cpus: whole(1) | None
    num_gpus: number(0) | None
    cpus_per_trial: number(0, strict=True)
    gpus_per_trial: number(0)
    max_concurrent: whole(1) | None
    num_samples: whole(1)
    space_seed: whole(0)
    space: Mapping | None
    scheduler: SchedulerConfig
    max_failures: whole(0)
    reuse_actors: Flag
    resume: Flag
    name: Text | None
    top_k: whole(1)
