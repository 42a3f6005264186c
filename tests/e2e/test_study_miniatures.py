"""The committed studies in miniature: `study=headroom_resnet8` and `study=search_v2_mobilenet_v2`
compose every run, and run their pipelines end to end at a few steps each, so a change that breaks a
row of a long study fails here in minutes instead of an hour into the study. The command line's
overrides come after the study's own, so they shorten every run."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from benchmarks.headroom_gate import gate
from framework.study.plan import compose_stage, plan_study
from tests.conftest import compose_config, read_json, run_stage_in_process

#: every stage a few steps on a few images (the command line wins over the study's overrides)
TINY = ("tracking.enabled=false", "data.fraction=0.01", "data.val_fraction=0.01", "data.test_fraction=0.05",
        "proxy.val_fraction=0.01", "train.max_steps=2",
        "finetune.max_steps=2", "finetune.batch_size=32", "search.max_steps=3", "search.warmup_steps=1",
        "search.batch_size=32", "proxy.fraction=0.01", "sensitivity.batches=1", "sensitivity.batch_size=32",
        "sensitivity.probes=2")


def test_the_headroom_study_runs_in_miniature_and_its_gate_reads_it(tmp_path, pretrained_checkpoint):
    folder = tmp_path / "headroom"
    run_stage_in_process("study", folder, "study=headroom_resnet8", "study.seeds=[0,1]",
                         f"study.init_checkpoint={pretrained_checkpoint}", *TINY)
    report = read_json(folder / "study.json")
    rows = [row["name"] for row in report["rows"]]
    assert {"uniform-3-2", "uniform-2-3", "random", "hawq", "sensitivity"} <= set(rows)
    budget = next(run["policy_budget"]["bitops"] for run in report["runs"] if run["row"] == "hawq")
    for run in report["runs"]:  # the uniform splits fill the budget without recording one
        assert run["bitops"] <= budget * (1 + 1e-9), run["dir"]
        assert 0.0 <= run["val_top1"] <= 1.0  # every fine-tune scored its held-out split
    for spec in ("hawq", "sensitivity"):
        policy = read_json(folder / "runs" / spec / "seed0" / "finetune" / "policy.json")
        assert policy["provenance"]["method"] == spec
    result = gate(folder)
    uniform = {row: mean(run["val_top1"] for run in report["runs"] if run["row"] == row)
               for row in rows if row.startswith("uniform")}
    assert result["best_uniform"] == max(uniform, key=uniform.get)
    assert {r["row"] for r in result["rows"]} == set(rows) - {result["best_uniform"]}
    assert all(r["n"] == 2 for r in result["rows"])


def test_every_run_of_the_search_v2_study_composes():
    plan = plan_study(compose_config("study", ["study=search_v2_mobilenet_v2"]), Path("/nonexistent"))
    assert len(plan.runs) == 11 * 3
    for run in [run for run in plan.runs if run.seed == 0]:  # the seeds change only `seed=` and the random draw
        cfg = compose_stage("finetune", run.overrides, run.dir)
        assert (cfg.model.name, cfg.model.options.width_mult, cfg.quant.per_channel) == ("mobilenet_v2", 0.5, True)
        if run.searches:
            cfg = compose_stage("search", run.overrides, run.dir)
            assert cfg.search.quant.per_channel and cfg.search.complexity.mode == "dual_target"


def test_the_search_v2_study_runs_its_searches_in_miniature(tmp_path):
    """The pretraining, best-of-K random, ASGA v2 on MNIST and DNAS v2 on the target, a few steps each
    (each as a Slurm job runs it: `study.only=<row>/<seed>`)."""
    folder = tmp_path / "study"
    args = ["study=search_v2_mobilenet_v2", f"study.dir={folder}", *TINY]
    for key in ("pretrain", "random-best/0", "asga-mnist/0", "dnas-target/0"):
        run_stage_in_process("study", tmp_path / "jobs" / key.replace("/", "_"), *args, f"study.only={key}")

    best = read_json(folder / "runs" / "random-best" / "seed0" / "finetune" / "policy.json")["provenance"]
    assert best["method"] == "random-best" and best["k"] == 8 and len(best["held_out_loss"]) == 8
    assert best["held_out_loss"][str(best["chosen_seed"])] == min(best["held_out_loss"].values())

    for row, proxy, head in (("asga-mnist", "mnist", "fresh"), ("dnas-target", "fashion_mnist", "kept")):
        run = read_json(folder / "runs" / row / "seed0" / "run.json")
        assert run["bitops"] <= run["policy_budget"]["bitops"] * (1 + 1e-9)
        search = read_json(folder / "runs" / row / "seed0" / "search" / "result.json")
        assert search["head"] == head  # MNIST's digits are not Fashion-MNIST's classes; the target's own are
        assert 0.0 <= search["decisiveness"]["entropy"] <= 1.0
        assert search["metrics"]["undecided"] == (search["decisiveness"]["entropy"] > 0.8)
        policy = read_json(folder / "runs" / row / "seed0" / "search" / "policy.json")
        assert policy["provenance"]["proxy"]["dataset"] == proxy
    asga = read_json(folder / "runs" / "asga-mnist" / "seed0" / "search" / "result.json")
    assert len(asga["rho_trace"]) == len(asga["grad_norm_trace"]) > 0  # ||g|| beside rho at every two-pass step
