"""`mpq landscape` end to end: on a quantized (fine-tuned) checkpoint it writes the diagnostics to
result.json, the loss-curve PNG and the Aim run (the stage's smoke run, in a subprocess); a
full-precision checkpoint is quantized by `policy=`; a missing checkpoint is one error line (those
two through the command's `main` in-process)."""

import math
from pathlib import Path

import pytest

from tests.conftest import (
    assert_one_error_line,
    read_result,
    run_mpq,
    run_mpq_in_process,
    run_stage_in_process,
)

#: a small measurement: the command's behaviour, not the defaults' cost
SMALL = ("landscape.batches=2", "landscape.batch_size=16", "landscape.max_iters=4", "landscape.points=5")


@pytest.fixture(scope="module")
def landscape_run(finetuned_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("landscape")
    proc = run_mpq("landscape", f"checkpoint={finetuned_checkpoint}", *SMALL, f"tracking.repo={base / 'aim'}",
                   f"hydra.run.dir={base / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run_dir": base / "run", "aim_repo": base / "aim", "proc": proc, "result": read_result(base / "run")}


@pytest.mark.smoke
def test_landscape_of_a_quantized_checkpoint_writes_its_metrics_and_curve(landscape_run, finetuned_checkpoint):
    result = landscape_run["result"]
    assert (result["stage"], result["status"], result["quantized"]) == ("landscape", "ok", True)
    metrics = result["metrics"]
    assert metrics["samples"] == 32 and metrics["batches"] == 2
    assert metrics["avg_w_bits"] < 8  # measured under the checkpoint's 4/4 policy (8-bit first and last layers)
    for key in ("loss", "top1", "hessian_top_eigenvalue", "hessian_rel_change", "surrogate_gap", "perturbed_loss",
                "grad_norm", "curve_min_t", "seconds"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 1 <= metrics["hessian_iterations"] <= 4 and isinstance(metrics["hessian_converged"], bool)
    assert len(result["hessian_history"]) == metrics["hessian_iterations"]
    assert metrics["hessian_top_eigenvalue"] == result["hessian_history"][-1]
    assert metrics["rho"] == 0.05
    assert metrics["perturbed_loss"] - metrics["loss"] == pytest.approx(metrics["surrogate_gap"])
    assert metrics["loss"] > 0 and 0 <= metrics["top1"] <= 1

    curve = result["curve"]
    assert curve["t"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and len(curve["loss"]) == 5
    assert curve["loss"][2] == pytest.approx(metrics["loss"], rel=1e-6)  # t = 0 is the checkpoint's own loss
    assert metrics["curve_min_t"] in curve["t"] and min(curve["loss"]) == metrics["curve_min_loss"]
    png = Path(result["artifacts"]["loss_curve"])
    assert png.parent == landscape_run["run_dir"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["artifacts"]["checkpoint"] == str(Path(finetuned_checkpoint))
    assert result["config"]["landscape"]["batch_size"] == 16
    # the summary line is on the console once
    assert sum("Hessian top eigenvalue" in line for line in landscape_run["proc"].stdout.splitlines()) == 1


def test_landscape_is_tracked_in_aim(landscape_run):
    from aim import Repo
    from aim.storage.context import Context
    from PIL import Image

    result = landscape_run["result"]
    run = {r.hash: r for r in Repo.from_path(str(landscape_run["aim_repo"])).iter_runs()}[result["tracking"]["run_hash"]]
    series = {m.name: m.data.items_list() for m in run.metrics()}  # (steps, [values, epochs, times])
    series = {name: [value for _, value in sorted(zip(steps, columns[0], strict=True))]
              for name, (steps, columns) in series.items()}
    assert series["hessian_top_eigenvalue"] == [pytest.approx(result["metrics"]["hessian_top_eigenvalue"])]
    assert series["surrogate_gap"] == [pytest.approx(result["metrics"]["surrogate_gap"])]
    assert series["hessian_eigenvalue_estimate"] == pytest.approx(result["hessian_history"])
    (image,) = run.get_image_sequence("loss_curve", Context({"subset": "train"})).values.values_list()
    assert image.to_pil_image().size == Image.open(result["artifacts"]["loss_curve"]).size
    assert run["landscape_curve"]["t"] == result["curve"]["t"]


def test_policy_quantizes_a_full_precision_checkpoint(pretrained_checkpoint, tmp_path):
    result = run_stage_in_process("landscape", tmp_path, f"checkpoint={pretrained_checkpoint}", "policy=uniform:4/4",
                                  *SMALL, "landscape.max_iters=2", "tracking.enabled=false")
    assert result["quantized"] is True and result["metrics"]["avg_w_bits"] < 8
    assert result["metrics"]["hessian_iterations"] <= 2 and math.isfinite(result["metrics"]["hessian_top_eigenvalue"])


def test_a_quantized_checkpoint_refuses_another_policy(finetuned_checkpoint, tmp_path):
    proc = run_mpq_in_process("landscape", f"checkpoint={finetuned_checkpoint}", "policy=uniform:2/2",
                              "tracking.enabled=false", f"hydra.run.dir={tmp_path}")
    assert_one_error_line(proc, "landscape", "already quantized", "drop policy=", run_dir=tmp_path)


def test_missing_checkpoint_is_one_error_line(tmp_path):
    proc = run_mpq_in_process("landscape", "tracking.enabled=false", f"hydra.run.dir={tmp_path}")
    assert_one_error_line(proc, "landscape", "landscape needs checkpoint=", run_dir=tmp_path)
