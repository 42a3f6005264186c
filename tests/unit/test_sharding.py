"""Data sharding, batch geometry and rank discovery for distributed runs."""

import pytest
import torch

from framework.data.loaders import EpochSampler, ShardSampler
from framework.dist.engine import batch_geometry, check_zero_stage, resolve_precision
from framework.dist.ranks import current_ranks, launched_ranks, slurm_rendezvous
from framework.errors import MPQError
from tests.conftest import compose_config


def _steps(sampler: EpochSampler, per_step: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i:i + per_step] for i in range(0, len(order), per_step)]


def test_two_ranks_split_each_global_batch_without_overlap():
    ranks = [EpochSampler(100, seed=3, micro_batch=8, rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    steps = [_steps(s, 8) for s in ranks]
    assert len(steps[0]) == len(steps[1]) == 100 // 16
    seen = [i for rank_steps in steps for step in rank_steps for i in step]
    assert len(seen) == len(set(seen)) == 6 * 16  # disjoint; the incomplete last global batch is dropped


def test_global_batches_do_not_depend_on_how_they_are_split():
    """1 process x 2 accumulation steps sees rank 0's then rank 1's micro-batch of 2 processes."""
    single = EpochSampler(96, seed=1, micro_batch=8, accumulation=2)
    pair = [EpochSampler(96, seed=1, micro_batch=8, rank=r, world_size=2) for r in (0, 1)]
    for step, combined in enumerate(_steps(single, 16)):
        assert combined[:8] == _steps(pair[0], 8)[step]
        assert combined[8:] == _steps(pair[1], 8)[step]


def test_a_rank_starts_mid_epoch_where_it_left_off():
    sampler = EpochSampler(64, seed=0, micro_batch=4, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=12)
    assert list(sampler) == full[12:] and len(sampler) == len(full) - 12


def test_epochs_differ_and_repeat():
    a, b = EpochSampler(50, seed=0, micro_batch=5), EpochSampler(50, seed=0, micro_batch=5)
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(2)
    assert list(a) != first


def test_evaluation_shards_cover_the_split_exactly_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_batch_geometry_splits_the_global_batch():
    cfg = compose_config("pretrain", ["dist.gradient_accumulation=2"]).dist
    g = batch_geometry(64, cfg, world_size=2)
    assert (g.micro_batch, g.accumulation, g.world_size, g.per_rank) == (16, 2, 2, 32)
    with pytest.raises(MPQError, match="multiple of 4"):
        batch_geometry(66, cfg, world_size=2)
    with pytest.raises(MPQError, match="dist.micro_batch=8"):
        batch_geometry(64, compose_config("pretrain", ["dist.micro_batch=8"]).dist, world_size=2)


def test_zero_stage_3_and_half_precision_on_the_cpu_are_refused():
    check_zero_stage(2, two_pass=True)
    with pytest.raises(MPQError, match="two-pass"):
        check_zero_stage(3, two_pass=True)
    with pytest.raises(MPQError, match="fp32"):
        resolve_precision("bf16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_ranks_come_from_torchrun_then_slurm_steps():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert current_ranks(torchrun).rank == 3 and current_ranks(torchrun).source == "torchrun"
    step = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "node1"}
    ranks = current_ranks(step)
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.source) == (1, 2, 1, "slurm")
    assert launched_ranks(step)
    assert slurm_rendezvous(step)[0] == "127.0.0.1"  # one node: loopback
    assert slurm_rendezvous(step) == slurm_rendezvous({**step, "SLURM_PROCID": "0"})  # every task agrees
    batch_script = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # sbatch's own shell
    assert current_ranks(batch_script).world_size == 1 and not launched_ranks(batch_script)
