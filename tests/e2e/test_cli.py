"""The `mpq` command end to end, in a subprocess, as a user runs it."""

from pathlib import Path

import pytest

from framework.paths import REPO_ROOT
from framework.stages import STAGES
from tests.conftest import read_json, run_mpq


def test_help_lists_every_stage():
    proc = run_mpq("--help")
    assert proc.returncode == 0
    for stage in STAGES.values():
        assert f"  {stage.name:<10}{stage.help}" in proc.stdout


def test_every_registered_stage_has_its_function():
    for stage in STAGES.values():
        assert callable(stage.function), stage.name
        assert stage.function.__name__ == f"run_{stage.name}"


def test_pretrain_acceptance_command_writes_ok_result(pretrained_run):
    result = pretrained_run["result"]
    assert result["stage"] == "pretrain" and result["status"] == "ok"
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    assert result["metrics"]["train_samples"] == 3000  # 5% of 60000, class-balanced
    assert result["config"]["model"]["name"] == "resnet8"
    assert result["config"]["data"]["fraction"] == 0.05
    assert result["artifacts"]["checkpoint"] == str(pretrained_run["run_dir"] / "checkpoints" / "last")
    for key in ("checkpoint", "best_checkpoint"):
        assert (Path(result["artifacts"][key]) / "model.pt").is_file()
    assert (pretrained_run["run_dir"] / "pretrain.log").exists()


def test_evaluate_scores_the_checkpoint_like_pretrain_did(pretrained_run, tmp_path):
    proc = run_mpq(
        "evaluate",
        f"checkpoint={pretrained_run['result']['artifacts']['checkpoint']}",
        f"hydra.run.dir={tmp_path}",
        "tracking.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "ok"
    assert result["metrics"]["samples"] == 10000
    assert result["metrics"]["top1"] == pytest.approx(pretrained_run["result"]["metrics"]["top1"], abs=1e-9)


def _assert_one_clear_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert len(proc.error_lines) == 1, proc.error_lines
    for fragment in fragments:
        assert fragment in proc.error_lines[0], proc.error_lines[0]


def test_missing_data_path(tmp_path):
    proc = run_mpq("pretrain", f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}", "tracking.enabled=false")
    _assert_one_clear_line(proc, "fashion_mnist", "not found", "make setup")
    assert read_json(tmp_path / "run" / "result.json")["status"] == "error"


def test_unknown_model(tmp_path):
    proc = run_mpq("pretrain", "model=resnet9", f"hydra.run.dir={tmp_path}")
    _assert_one_clear_line(proc, "unknown model 'resnet9'", "resnet20")
    assert not (tmp_path / "result.json").exists()


def test_corrupt_checkpoint(pretrained_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pretrained_run["result"]["artifacts"]["checkpoint"], bad)
    (bad / "model.pt").write_bytes((bad / "model.pt").read_bytes()[:1000])  # truncated, as after a crash
    proc = run_mpq("evaluate", f"checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}", "tracking.enabled=false")
    _assert_one_clear_line(proc, "corrupt", str(bad))
    assert read_json(tmp_path / "run" / "result.json")["status"] == "error"


def test_invalid_value(tmp_path):
    proc = run_mpq("pretrain", "train.epochs=0", f"hydra.run.dir={tmp_path}", "tracking.enabled=false")
    _assert_one_clear_line(proc, "train.epochs=0")


def test_launcher_ray_is_not_offered():
    proc = run_mpq("pretrain", "launcher=ray")
    _assert_one_clear_line(proc, "unknown launcher 'ray'", "local, slurm")


def test_unknown_stage():
    proc = run_mpq("train")
    _assert_one_clear_line(proc, "unknown stage 'train'", "pretrain")


def test_pipeline_runs_every_stage_and_prints_a_summary(tmp_path):
    proc = run_mpq("pipeline", "experiment=smoke", f"hydra.run.dir={tmp_path}", f"tracking.repo={tmp_path / 'aim'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "result.json")
    assert result["status"] == "ok"
    assert [row["stage"] for row in result["stages"]] == ["pretrain", "search", "finetune", "evaluate"]
    stages = {name: read_json(tmp_path / name / "result.json") for name in ("pretrain", "search", "finetune", "evaluate")}
    assert stages["pretrain"]["metrics"]["steps"] == 20
    assert stages["search"]["metrics"]["steps"] == 6 and stages["finetune"]["metrics"]["steps"] == 6
    # the fine-tuned model is the searched policy, and evaluate scores the fine-tuned checkpoint
    assert stages["finetune"]["artifacts"]["policy"] != stages["search"]["artifacts"]["policy"]
    assert read_json(Path(stages["finetune"]["artifacts"]["policy"]))["layers"] == read_json(
        Path(stages["search"]["artifacts"]["policy"]))["layers"]
    assert stages["evaluate"]["metrics"]["top1"] == result["metrics"]["top1"] == stages["finetune"]["metrics"]["top1"]
    assert result["metrics"]["fp_top1"] == stages["pretrain"]["metrics"]["top1"]
    assert result["metrics"]["gbitops"] == pytest.approx(stages["search"]["metrics"]["gbitops"])
    for line in ("mpq pipeline summary", "full-precision top-1", "quantized top-1", "GBitOps", "search", "finetune"):
        assert line in proc.stdout


def test_readme_names_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().endswith("make test")
