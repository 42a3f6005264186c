"""`mpq prepare` and `data.loader=ffcv` as a user runs them: a missing beton is one clear line (the
command called in-process), then the prepared files feed a few real training steps (`mpq prepare`
and `mpq pretrain` in subprocesses: the prepare stage's smoke run)."""

import pytest

from tests.conftest import assert_one_error_line, make_image_tree, run_mpq_in_process, run_stage


@pytest.mark.smoke
def test_prepare_then_pretrain_from_ffcv(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=3, per_class=8, size=(36, 28), suffix=".png")
    data = ["data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}", "data.ffcv.write.mode=raw",
            "data.ffcv.write.workers=1"]
    train = [*data, "data.loader=ffcv", "data.input_size=32", "data.num_workers=1", "model=resnet8",
             "train.batch_size=8", "train.eval_batch_size=8", "train.epochs=1", "train.max_steps=2",
             "tracking.enabled=false"]

    missing = run_mpq_in_process("pretrain", *train, f"hydra.run.dir={tmp_path / 'before'}")
    line = assert_one_error_line(missing, "pretrain", "no FFCV file", str(tmp_path / "betons"), "mpq prepare data=imagefolder",
                                 run_dir=tmp_path / "before")

    assert line.split("write it with: ", 1)[1].startswith("mpq prepare ")
    prepare_args = line.split("write it with: mpq prepare ", 1)[1].split()  # the command the error names
    written = run_stage("prepare", tmp_path / "prepare", *prepare_args, "data.ffcv.write.workers=1")
    assert written["metrics"]["written"] == 2

    result = run_stage("pretrain", tmp_path / "run", *train)
    assert result["config"]["data"]["loader"] == "ffcv"
    assert result["metrics"]["steps"] == 2 and result["metrics"]["test_samples"] == 24
