"""The study report's account of how decided each searched row's searches ended."""

from __future__ import annotations

import json

import pytest

from framework.study.report import build_report, format_markdown


def _run(row, seed, top1, search=None):
    run = {"row": row, "seed": seed, "dir": f"runs/{row}/seed{seed}", "top1": top1, "gbitops": 0.06, "size_mb": 0.3,
           "bitops": 6e7, "seconds": 10.0, "policy": {"a": [2, 2]}, "policy_budget": {"bitops": 7e7}}
    if search is not None:
        run["search"] = {"images_processed": 1000, "seconds": 5.0, **search}
    return run


def test_searched_rows_report_their_decisiveness_read_back_where_a_run_did_not_record_it(tmp_path):
    rows = [{"name": "uniform", "policy": "uniform:3/3"}, {"name": "dnas", "search": "dnas", "proxy": "mnist"}]
    runs = [_run("uniform", 0, 0.84), _run("uniform", 1, 0.85),
            _run("dnas", 0, 0.86, {"entropy": 0.6, "argmax_bitops_ratio": 1.1, "fit_changed_layers": 2, "undecided": False}),
            _run("dnas", 1, 0.85, {})]  # recorded before run.json kept it: its search/result.json has it
    (tmp_path / "runs/dnas/seed1/search").mkdir(parents=True)
    (tmp_path / "runs/dnas/seed1/search/result.json").write_text(json.dumps({"status": "ok", "metrics": {
        "entropy": 0.9, "argmax_bitops_ratio": 1.3, "fit_changed_layers": 6, "undecided": True}}))
    report = build_report({"name": "t", "seeds": [0, 1], "reference": "dnas", "baselines": ["uniform"]}, rows, runs,
                          None, tmp_path)
    dnas = next(s for s in report["rows"] if s["name"] == "dnas")
    assert dnas["entropy_mean"] == pytest.approx(0.75) and dnas["fit_changed_layers_mean"] == pytest.approx(4)
    assert dnas["argmax_bitops_ratio_mean"] == pytest.approx(1.2) and dnas["undecided_runs"] == 1
    assert "entropy_mean" not in next(s for s in report["rows"] if s["name"] == "uniform")
    assert "| dnas | 0.750 | 1.20 | 4.0 | 1 of 2 |" in format_markdown(report)
