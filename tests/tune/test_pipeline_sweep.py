"""`mpq sweep` and `mpq pipeline pipeline.sweep=true` as a user runs them, in a subprocess: a sweep of
one tiny trial (the sweep stage's smoke run) and, slow, the pipeline with a two-trial sweep."""

from __future__ import annotations

import pytest

from framework.stage.checks import uniform_frontier_specs
from tests.conftest import (
    assert_one_error_line,
    compose_config,
    policy_layers,
    read_json,
    run_mpq,
    run_mpq_in_process,
    run_stage,
)
from tests.tune.conftest import TINY_TRIAL

TWO_SEEDS = ["~tune.space", "+tune.space={seed: {range: [0, 2]}}", "tune.scheduler.name=fifo", "tune.num_cpus=2",
             ]


def test_sweep_without_a_checkpoint_is_one_clear_line(tmp_path):
    proc = run_mpq_in_process("sweep", f"hydra.run.dir={tmp_path}", "tracking.enabled=false")
    assert_one_error_line(proc, "sweep", "init_checkpoint=", run_dir=tmp_path)


@pytest.mark.smoke
@pytest.mark.ray
def test_a_sweep_of_one_tiny_trial_selects_its_policy(tmp_path, pretrained_checkpoint):
    """Ray started by the command on 127.0.0.1, one trial: two DNAS steps on 150 MNIST images."""
    result = run_stage("sweep", tmp_path, f"init_checkpoint={pretrained_checkpoint}", *TINY_TRIAL, "search=dnas",
                       "~tune.space", "+tune.space={seed: {grid: [0]}}", "search.epochs=1", "search.max_steps=2",
                       "tune.scheduler.name=fifo", "tune.num_cpus=1", "tracking.enabled=false")
    assert result["metrics"]["trials"] == 1 and result["metrics"]["finished"] == 1
    (trial,) = result["trials"]
    assert trial["status"] == "finished" and trial["key"] == result["metrics"]["selected_trial"]
    policy = read_json(tmp_path / "policy.json")
    assert policy["provenance"]["sweep"]["trial"] == trial["key"]
    assert policy["cost"]["target"]["bitops"] <= result["metrics"]["budget_bitops"] * (1 + 1e-9)
    assert policy_layers(tmp_path / "policy.json") == policy_layers(trial["policy"])


@pytest.mark.slow  # ~90 s (pretrain, a 2-trial sweep, 2 fine-tunings): `make test-all`
@pytest.mark.ray
def test_pipeline_with_a_sweep_finetunes_the_top_k_policies(tmp_path):
    proc = run_mpq("pipeline", "experiment=smoke", "pipeline.sweep=true", "tune.top_k=2", *TWO_SEEDS,
                   f"hydra.run.dir={tmp_path}", f"tracking.repo={tmp_path / 'aim'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_json(tmp_path / "result.json")
    assert [row["stage"] for row in result["stages"]] == [
        "pretrain", "sweep", "finetune", "evaluate", "finetune_top2", "evaluate_top2", "export",
        *(f"finetune_baseline_{s.split(':', 1)[1].replace('/', '-')}"
          for s in uniform_frontier_specs(compose_config("pipeline", ["experiment=smoke"]))),
        "evaluate_baseline"]
    sweep = read_json(tmp_path / "sweep" / "result.json")
    assert sweep["metrics"]["finished"] == 2 and (tmp_path / "sweep" / "pareto.png").exists()
    top = sweep["selection"]["top"]
    assert [t["key"] for t in top] == [t["trial"] for t in result["finetuned"]]
    assert top[0]["key"] == sweep["metrics"]["selected_trial"] == result["metrics"]["selected_trial"]
    assert top[0]["proxy_top1"] >= top[1]["proxy_top1"]

    # each fine-tuning ran its own policy, and each evaluation scored its own fine-tuned checkpoint
    for suffix, chosen in (("", sweep["artifacts"]["policy"]), ("_top2", top[1]["policy"])):
        fine = read_json(tmp_path / f"finetune{suffix}" / "result.json")
        assert policy_layers(fine["artifacts"]["policy"]) == policy_layers(chosen)
        evaluated = read_json(tmp_path / f"evaluate{suffix}" / "result.json")
        assert evaluated["config"]["checkpoint"] == fine["artifacts"]["checkpoint"]
        assert evaluated["metrics"]["top1"] == fine["metrics"]["top1"]
    assert policy_layers(sweep["artifacts"]["policy"]) == policy_layers(top[0]["policy"])
    assert result["metrics"]["top1"] == read_json(tmp_path / "evaluate" / "result.json")["metrics"]["top1"]
    assert result["finetuned"][1]["top1"] == read_json(tmp_path / "evaluate_top2" / "result.json")["metrics"]["top1"]
    for text in ("Ray Tune sweep", "2 of 2 trials finished", "best on the proxy first", "sweep/pareto.png"):
        assert text in proc.stdout, proc.stdout[-2000:]
