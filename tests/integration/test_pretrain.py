"""A short real pretrain learns: well above chance on held-out Fashion-MNIST."""

import pytest
import torch

from framework.results import read_result
from framework.stages.evaluate import run_evaluate
from framework.stages.pretrain import run_pretrain
from tests.conftest import compose_config


@pytest.mark.slow  # 46 steps on 6,000 images and two evaluations of 2,000 (about a minute on 2 cores): `make test-all`;
# the fast tier's pretrain smoke (tests/e2e/test_cli.py) checks a shorter run beats chance
def test_short_pretrain_beats_chance_by_a_wide_margin(tmp_path):
    cfg = compose_config(
        "pretrain",
        [
            "data.per_class=600",         # 6000 images (of the 54,000 not held out), 46 steps of 128
            "data.test_fraction=0.2",     # 2000 held-out images
            "train.epochs=1",
            "tracking.enabled=false",
            f"run_dir={tmp_path}",
        ],
    )
    result = run_pretrain(cfg)
    on_disk = read_result(tmp_path)
    assert on_disk["status"] == "ok" and on_disk["metrics"]["top1"] == result.metrics["top1"]
    assert result.metrics["test_samples"] == 2000
    assert result.metrics["top1"] > 0.6, result.metrics  # chance is 0.1

    # the written checkpoint scores the same through the evaluate stage
    ev_cfg = compose_config(
        "evaluate",
        ["data.test_fraction=0.2", "tracking.enabled=false", f"checkpoint={result.artifacts['checkpoint']}",
         f"run_dir={tmp_path / 'eval'}"],
    )
    ev = run_evaluate(ev_cfg)
    assert abs(ev.metrics["top1"] - result.metrics["top1"]) < 1e-9


def test_max_steps_bounds_training(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=3", "train.epochs=5")
    result = run_pretrain(cfg)
    assert result.metrics["steps"] == 3 and result.metrics["epochs"] == 1
    # the schedule is stepped by the DeepSpeed engine and saved in its part of the checkpoint
    engine_state = torch.load(f"{result.artifacts['checkpoint']}/deepspeed/mp_rank_00_model_states.pt", weights_only=False)
    assert engine_state["lr_scheduler"]["last_epoch"] == 3
