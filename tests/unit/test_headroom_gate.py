"""benchmarks/headroom_gate.py: the best uniform split is picked on validation, rows pass on test, paired."""

from __future__ import annotations

import json

import pytest

from benchmarks.headroom_gate import gate


def _study(folder, rows: dict[str, list[tuple[float, float]]]):
    """rows: name -> per seed (test top-1, validation top-1)."""
    runs = [{"row": row, "seed": seed, "dir": f"runs/{row}/seed{seed}", "top1": test, "val_top1": val}
            for row, values in rows.items() for seed, (test, val) in enumerate(values)]
    (folder / "study.json").write_text(json.dumps({"runs": runs}))
    return folder


def test_the_best_uniform_split_is_chosen_on_validation_not_test(tmp_path):
    study = _study(tmp_path, {
        "uniform-3-2": [(0.900, 0.880), (0.905, 0.881), (0.902, 0.879)],   # better on test
        "uniform-2-3": [(0.895, 0.890), (0.897, 0.891), (0.896, 0.889)],   # better on validation: the one chosen
        "hawq": [(0.915, 0.9), (0.918, 0.9), (0.916, 0.9)],                # +2 points on every seed
        "random": [(0.905, 0.9), (0.885, 0.9), (0.900, 0.9)],              # noisy
    })
    result = gate(study)
    assert result["best_uniform"] == "uniform-2-3"
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["hawq"]["passes"] and rows["hawq"]["low"] > 0 and rows["hawq"]["mean"] >= rows["hawq"]["threshold"]
    assert not rows["random"]["passes"] and rows["random"]["verdict"] == "no difference"
    assert rows["uniform-3-2"]["mean"] > 0  # the other split is still compared (on test) with the chosen one


def test_a_consistent_gain_below_the_threshold_does_not_pass(tmp_path):
    study = _study(tmp_path, {
        "uniform-2-3": [(0.896, 0.89), (0.897, 0.89), (0.898, 0.89)],
        "sensitivity": [(0.898, 0.89), (0.899, 0.89), (0.900, 0.89)],   # +0.2 points on every seed: under 0.3
    })
    (row,) = gate(study)["rows"]
    assert row["low"] > 0 and row["threshold"] == 0.003 and not row["passes"]


def test_random_rows_are_pooled_per_seed(tmp_path):
    """Two random rows (random:<seed>, random:<seed + 100>): the pooled row is their per-seed mean, paired."""
    study = _study(tmp_path, {
        "uniform-3-3": [(0.900, 0.89), (0.902, 0.89), (0.904, 0.89)],
        "random": [(0.890, 0.88), (0.894, 0.88), (0.896, 0.88)],
        "random-b": [(0.896, 0.88), (0.898, 0.88), (0.904, 0.88)],
    })
    report = json.loads((study / "study.json").read_text())
    report["rows"] = [{"name": "uniform-3-3", "source": "uniform:3/3"}, {"name": "random", "source": "random:<seed>"},
                      {"name": "random-b", "source": "random:<seed + 100>"}]
    (study / "study.json").write_text(json.dumps(report))
    result = gate(study)
    rows = {r["row"]: r for r in result["rows"]}
    assert result["pooled_random"] == ["random", "random-b"]
    pooled = rows["random (pooled)"]
    assert pooled["n"] == 3 and pooled["mean"] == pytest.approx(((0.893 - 0.900) + (0.896 - 0.902) + (0.900 - 0.904)) / 3)
