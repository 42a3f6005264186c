"""`mpq prepare` and `data.loader=ffcv` as a user runs them: a missing beton is one clear line, then
the prepared files feed a few real training steps."""

from tests.conftest import make_image_tree, read_json, run_mpq


def test_prepare_then_pretrain_from_ffcv(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=3, per_class=8, size=(36, 28), suffix=".png")
    data = ["data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}", "data.ffcv.write.mode=raw",
            "data.ffcv.write.workers=1"]
    train = [*data, "data.loader=ffcv", "data.input_size=32", "data.num_workers=1", "model=resnet8",
             "train.batch_size=8", "train.eval_batch_size=8", "train.epochs=1", "train.max_steps=2",
             "tracking.enabled=false"]

    missing = run_mpq("pretrain", *train, f"hydra.run.dir={tmp_path / 'before'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.error_lines) == 1, missing.error_lines
    line = missing.error_lines[0]
    assert "no FFCV file" in line and str(tmp_path / "betons") in line and "mpq prepare data=imagefolder" in line
    assert read_json(tmp_path / "before" / "result.json")["status"] == "error"

    assert line.split("write it with: ", 1)[1].startswith("mpq prepare ")
    prepare_args = line.split("write it with: mpq prepare ", 1)[1].split()  # the command the error names
    prepared = run_mpq("prepare", *prepare_args, "data.ffcv.write.workers=1", f"hydra.run.dir={tmp_path / 'prepare'}")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    written = read_json(tmp_path / "prepare" / "result.json")
    assert written["status"] == "ok" and written["metrics"]["written"] == 2

    proc = run_mpq("pretrain", *train, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "run" / "result.json")
    assert result["status"] == "ok" and result["config"]["data"]["loader"] == "ffcv"
    assert result["metrics"]["steps"] == 2 and result["metrics"]["test_samples"] == 24
