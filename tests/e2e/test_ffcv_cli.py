"""`mpq prepare` and `data.loader=ffcv` as a user runs them: a missing beton is one clear line, then
the prepared files feed a few real training steps."""

from framework.pipeline import run_prepare
from tests.conftest import compose_config, read_json, run_mpq
from tests.unit.test_ffcv import _tree


def test_prepare_then_pretrain_from_ffcv(tmp_path):
    root = _tree(tmp_path / "tree", classes=3, per_class=8)
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

    prepared = run_prepare(compose_config("prepare", [*data, f"run_dir={tmp_path / 'prepare'}"]))
    assert prepared.metrics["written"] == 2
    assert read_json(tmp_path / "prepare" / "result.json")["status"] == "ok"

    proc = run_mpq("pretrain", *train, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "run" / "result.json")
    assert result["status"] == "ok" and result["config"]["data"]["loader"] == "ffcv"
    assert result["metrics"]["steps"] == 2 and result["metrics"]["test_samples"] == 24
