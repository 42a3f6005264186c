"""Runs that repeat to the bit: the same `mpq finetune` twice, at two threads on the native kernel
backend, writes bit-identical checkpoints, and its result.json and checkpoint name the backend."""

from __future__ import annotations

import json

import pytest

from framework.quant import native
from tests.conftest import assert_same_weights, read_json, run_stage


@pytest.mark.slow  # two fine-tunings in new processes (the same command twice): `make test-all`
@pytest.mark.skipif(not native.available(), reason="the C kernels do not build here (no C compiler)")
def test_a_finetune_repeated_at_two_threads_on_the_native_kernels_gives_the_same_checkpoint(
        pretrained_checkpoint, tmp_path):
    args = [f"init_checkpoint={pretrained_checkpoint}", "policy=uniform:3/3", "data.fraction=0.03",
            "data.test_fraction=0.05", "finetune.max_steps=6", "finetune.batch_size=64", "threads=2",
            "quant.kernels=native", "seed=3", "tracking.enabled=false"]
    results = [run_stage("finetune", tmp_path / name, *args) for name in ("first", "second")]
    assert_same_weights(tmp_path / "first", tmp_path / "second")
    for name, result in zip(("first", "second"), results, strict=True):
        kernels = result["kernels"]
        assert kernels["requested"] == "native" and kernels["backend"] == "native" and kernels["threads"] == 2
        assert "libmpq_quant-" in kernels["build_key"]
        meta = read_json(tmp_path / name / "checkpoints" / "last" / "meta.json")
        assert meta["kernels"] == kernels
    assert json.dumps(results[0]["metrics"]["top1"]) == json.dumps(results[1]["metrics"]["top1"])
