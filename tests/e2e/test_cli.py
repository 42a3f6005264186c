"""The `mpq` command end to end, in a subprocess, as a user runs it: the smoke runs of pretrain,
search, finetune, evaluate and the pipeline (marked smoke: `make test` keeps them), and the one-line
error contract (errors that need no new process are checked through the command's `main` in-process)."""

from pathlib import Path

import pytest

from framework.paths import REPO_ROOT
from framework.stages import STAGES
from tests.conftest import (
    assert_one_error_line,
    policy_layers,
    read_json,
    read_result,
    run_mpq,
    run_mpq_in_process,
    run_stage,
)


def test_help_lists_every_stage():
    proc = run_mpq("--help")
    assert proc.returncode == 0
    for stage in STAGES.values():
        assert f"  {stage.name:<10}{stage.help}" in proc.stdout


def test_every_registered_stage_has_its_function():
    for stage in STAGES.values():
        assert callable(stage.function), stage.name
        assert stage.function.__name__ == f"run_{stage.name}"


@pytest.mark.smoke
def test_pretrain_acceptance_command_writes_ok_result(pretrained_run):
    result = pretrained_run["result"]
    assert result["stage"] == "pretrain" and result["status"] == "ok"
    # one epoch of 23 steps reaches 0.47-0.48 on the 10,000 test images (seeds 0, 1); chance is 0.1
    assert result["metrics"]["top1"] > 0.3, result["metrics"]
    assert result["metrics"]["test_samples"] == 10000 and result["metrics"]["steps"] == 2700 // 128
    # 5% of the 54,000 training images left after data.val_fraction=0.1 held 6,000 out, class-balanced
    assert result["metrics"]["train_samples"] == 2700 and result["metrics"]["val_samples"] == 6000
    # the best checkpoint is chosen on the held-out images; the test split is scored once, at the end
    history = result["history"]
    assert result["metrics"]["best_top1"] == max(entry["val_top1"] for entry in history)
    assert history[-1]["test_top1"] == result["metrics"]["top1"]
    assert result["config"]["model"]["name"] == "resnet8"
    assert result["config"]["data"]["fraction"] == 0.05
    assert result["artifacts"]["checkpoint"] == str(pretrained_run["run_dir"] / "checkpoints" / "last")
    for key in ("checkpoint", "best_checkpoint"):
        assert (Path(result["artifacts"][key]) / "model.pt").is_file()
    assert (pretrained_run["run_dir"] / "pretrain.log").exists()


@pytest.mark.smoke
def test_evaluate_scores_the_checkpoint_like_pretrain_did(pretrained_run, pretrained_checkpoint, tmp_path):
    result = run_stage("evaluate", tmp_path, f"checkpoint={pretrained_checkpoint}", "tracking.enabled=false")
    assert result["metrics"]["samples"] == 10000
    assert result["metrics"]["top1"] == pytest.approx(pretrained_run["result"]["metrics"]["top1"], abs=1e-9)


@pytest.mark.smoke
def test_search_writes_a_policy_within_the_budget(pretrained_checkpoint, tmp_path):
    """`mpq search` for three DNAS steps on 200 MNIST proxy images."""
    result = run_stage("search", tmp_path, f"init_checkpoint={pretrained_checkpoint}", "search=dnas", "proxy.per_class=20",
                       "proxy.test_fraction=0.02", "proxy.val_fraction=0.01", "search.batch_size=40", "search.max_steps=3",
                       "tracking.enabled=false")
    assert result["metrics"]["steps"] == 3
    assert result["metrics"]["gbitops"] <= result["metrics"]["budget_gbitops"] * (1 + 1e-9)
    policy = read_json(result["artifacts"]["policy"])
    assert policy["provenance"]["method"] == "dnas" and policy["layers"]
    assert {name for name, layer in policy["layers"].items() if layer["fixed"]} == {"conv1", "fc"}
    assert (tmp_path / "policy.png").is_file()


@pytest.mark.smoke
def test_finetune_writes_a_checkpoint_quantized_by_its_policy(finetuned_run):
    """The session's `mpq finetune` (policy=uniform:4/4, three steps), which the export and landscape
    smoke runs start from."""
    result = finetuned_run["result"]
    assert result["metrics"]["steps"] == 3 and result["config"]["policy"] == "uniform:4/4"
    layers = policy_layers(result["artifacts"]["policy"])
    assert {(layer["w_bits"], layer["a_bits"]) for layer in layers.values() if not layer["fixed"]} == {(4, 4)}
    checkpoint = Path(result["artifacts"]["checkpoint"])
    assert (checkpoint / "model.pt").is_file() and read_json(checkpoint / "meta.json")["quant"]


def test_missing_data_path(tmp_path):
    proc = run_mpq_in_process("pretrain", f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}",
                              "tracking.enabled=false")
    assert_one_error_line(proc, "pretrain", "fashion_mnist", "not found", "make setup", run_dir=tmp_path / "run")


def test_unknown_model(tmp_path):
    proc = run_mpq("pretrain", "model=resnet9", f"hydra.run.dir={tmp_path}")
    assert_one_error_line(proc, "pretrain", "unknown model 'resnet9'", "resnet20")
    assert not (tmp_path / "result.json").exists()


def test_corrupt_checkpoint(pretrained_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pretrained_checkpoint, bad)
    (bad / "model.pt").write_bytes((bad / "model.pt").read_bytes()[:1000])  # truncated, as after a crash
    proc = run_mpq_in_process("evaluate", f"checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}", "tracking.enabled=false")
    assert_one_error_line(proc, "evaluate", "corrupt", str(bad), run_dir=tmp_path / "run")


def test_invalid_value(tmp_path):
    """In a new process, as a user meets it: the one line is all of stderr after torch, Hydra and the
    config's validation ran (the other error tests call the command in-process)."""
    proc = run_mpq("pretrain", "train.epochs=0", f"hydra.run.dir={tmp_path}", "tracking.enabled=false")
    assert_one_error_line(proc, "pretrain", "train.epochs=0", run_dir=tmp_path)


def test_an_unknown_launcher_lists_the_launchers_there_are():
    proc = run_mpq("pretrain", "launcher=kubernetes")
    assert_one_error_line(proc, "pretrain", "unknown launcher 'kubernetes'", "local, ray, slurm")


def test_unknown_stage():
    proc = run_mpq("train")
    assert_one_error_line(proc, None, "unknown stage 'train'", "pretrain")


@pytest.mark.smoke
def test_pipeline_runs_every_stage_and_prints_a_summary(smoke_pipeline):
    proc, tmp_path = smoke_pipeline["proc"], smoke_pipeline["run_dir"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_result(tmp_path)
    assert result["status"] == "ok"
    assert [row["stage"] for row in result["stages"]] == [
        "pretrain", "search", "finetune", "evaluate", "export", "finetune_baseline_3-2", "finetune_baseline_2-3",
        "evaluate_baseline", "finetune_seed1", "finetune_baseline_seed1"]  # the fixture runs pipeline.seeds=2
    stages = {name: read_result(tmp_path / name) for name in (
        "pretrain", "search", "finetune", "evaluate", "finetune_baseline_3-2", "finetune_baseline_2-3",
        "evaluate_baseline", "finetune_seed1", "finetune_baseline_seed1")}
    # the baseline: of the uniform splits that fill 2.5 bits (3/2, 2/3), the one of the higher validation top-1
    val = {split: stages[f"finetune_baseline_{split}"]["history"][-1]["val_top1"] for split in ("3-2", "2-3")}
    chosen = max(val, key=val.get)
    assert result["baseline"]["policy"] == "uniform:" + chosen.replace("-", "/")
    stages["finetune_baseline"] = stages[f"finetune_baseline_{chosen}"]
    assert stages["evaluate_baseline"]["config"]["checkpoint"] == stages["finetune_baseline"]["artifacts"]["checkpoint"]
    assert stages["pretrain"]["metrics"]["steps"] == 20
    assert stages["search"]["metrics"]["steps"] == 6 and stages["finetune"]["metrics"]["steps"] == 6
    # the fine-tuned model is the searched policy, and evaluate scores the fine-tuned checkpoint
    assert stages["finetune"]["artifacts"]["policy"] != stages["search"]["artifacts"]["policy"]
    assert policy_layers(stages["finetune"]["artifacts"]["policy"]) == policy_layers(stages["search"]["artifacts"]["policy"])
    assert stages["evaluate"]["metrics"]["top1"] == result["metrics"]["top1"] == stages["finetune"]["metrics"]["top1"]
    assert result["metrics"]["fp_top1"] == stages["pretrain"]["metrics"]["top1"]
    assert result["metrics"]["gbitops"] == pytest.approx(stages["search"]["metrics"]["gbitops"])
    for line in ("mpq pipeline summary", "full-precision top-1", "quantized top-1", "GBitOps", "search", "finetune",
                 f"uniform {chosen.replace('-', '/')} (baseline)", "searched minus baseline", "exported", "export parity"):
        assert line in proc.stdout
    # the fine-tuned model exported, its parity checked on the test images the evaluation used
    exported = read_result(tmp_path / "export")
    assert exported["artifacts"]["checkpoint"] == stages["finetune"]["artifacts"]["checkpoint"]
    assert exported["metrics"]["framework_top1"] == pytest.approx(stages["evaluate"]["metrics"]["top1"])
    assert exported["metrics"]["images"] == stages["evaluate"]["metrics"]["samples"]
    assert result["metrics"]["export"]["packed_top1"] == exported["metrics"]["packed_top1"]
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "export" / "model.onnx").is_file()
    # beside it, the uniform baseline within the same budget, fine-tuned the same way from the same checkpoint
    baseline = policy_layers(stages["finetune_baseline"]["artifacts"]["policy"])
    assert len({(layer["w_bits"], layer["a_bits"]) for layer in baseline.values() if not layer["fixed"]}) == 1
    assert stages["finetune_baseline"]["config"]["init_checkpoint"] == stages["finetune"]["config"]["init_checkpoint"]
    assert stages["finetune_baseline"]["metrics"]["steps"] == stages["finetune"]["metrics"]["steps"]
    assert result["metrics"]["baseline_gbitops"] <= stages["search"]["metrics"]["budget_gbitops"] * (1 + 1e-9)
    assert result["metrics"]["baseline_top1"] == stages["evaluate_baseline"]["metrics"]["top1"]
    assert result["metrics"]["top1_minus_baseline"] == pytest.approx(result["metrics"]["top1"] - result["metrics"]["baseline_top1"])
    # pipeline.seeds=2: both policies fine-tuned again at seed 1 from the same checkpoint, read as a paired difference
    for name, policy in (("finetune_seed1", stages["finetune"]), ("finetune_baseline_seed1", stages["finetune_baseline"])):
        again = stages[name]
        assert again["config"]["seed"] == 1 and again["config"]["policy"] == policy["config"]["policy"]
        assert again["config"]["init_checkpoint"] == policy["config"]["init_checkpoint"]
    metrics = result["metrics"]
    assert metrics["seeds"] == [0, 1]
    assert metrics["top1_seeds"] == [metrics["top1"], stages["finetune_seed1"]["metrics"]["top1"]]
    assert metrics["baseline_top1_seeds"] == [metrics["baseline_top1"], stages["finetune_baseline_seed1"]["metrics"]["top1"]]
    paired = metrics["paired"]
    assert paired["values"] == pytest.approx([a - b for a, b in zip(metrics["top1_seeds"], metrics["baseline_top1_seeds"], strict=False)])
    assert paired["low"] <= paired["mean"] <= paired["high"]
    assert "mean of 2 paired seeds" in proc.stdout and paired["verdict"] in proc.stdout


def test_readme_names_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    # CI runs both tiers: `make test` (the README's) and the slow tests
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test-all")
