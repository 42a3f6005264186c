"""The study results quoted in the README and the findings pages are the committed studies' numbers (docs/study/)."""

import json

from framework.paths import REPO_ROOT
from framework.stats import paired_difference


def top1_cell(row: dict) -> str:
    """A row's top-1 as the tables print it: mean ± seed spread, in percent."""
    return f"{100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}"


def paired_cells(report: dict, row: str, best: str) -> str:
    """The table cells `| mean | [low, high] |` of row minus best, paired by seed (percent points)."""
    by_row: dict[str, dict[int, float]] = {}
    for run in report["runs"]:
        by_row.setdefault(run["row"], {})[run["seed"]] = run["top1"]
    seeds = sorted(by_row[row])
    paired = paired_difference([by_row[row][s] for s in seeds], [by_row[best][s] for s in seeds])
    return f"| {100 * paired['mean']:+.2f} | [{100 * paired['low']:+.2f}, {100 * paired['high']:+.2f}] |"

STUDY = REPO_ROOT / "docs" / "study" / "fmnist_resnet8"


def test_the_fmnist_resnet8_findings_table_is_the_committed_study_json():
    report = json.loads((STUDY / "study.json").read_text())
    findings = (REPO_ROOT / "docs" / "studies" / "fmnist_resnet8.md").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert report["study"]["name"] == "fmnist_resnet8" and len(report["runs"]) == 12 * 3
    for row in report["rows"]:
        assert row["n"] == 3, row["name"]
        assert top1_cell(row) in findings, row["name"]
    uniform = next(row for row in report["rows"] if row["name"] == "uniform-budget")
    assert top1_cell(uniform) in readme  # the one figure it quotes
    for figure in report["figures"].values():
        assert (STUDY / figure).stat().st_size > 0
        assert f"../study/fmnist_resnet8/{figure}" in findings
    assert (STUDY / "study.md").read_text().startswith("# Study `fmnist_resnet8`")


HEADROOM = REPO_ROOT / "docs" / "study" / "headroom_resnet8"


def test_the_readme_headroom_table_is_the_committed_study_json():
    report = json.loads((HEADROOM / "study.json").read_text())
    readme = (REPO_ROOT / "README.md").read_text()
    assert report["study"]["name"] == "headroom_resnet8" and len(report["runs"]) == 5 * 5
    # uniform-2-3 is the split the validation top-1 picked (docs/study/headroom_resnet8/gate.md)
    assert "best uniform split (by mean validation top-1): uniform-2-3" in (HEADROOM / "gate.md").read_text()
    for row in report["rows"]:
        assert row["n"] == 5, row["name"]
        assert top1_cell(row) in readme, row["name"]
        if row["name"] != "uniform-2-3":
            assert paired_cells(report, row["name"], "uniform-2-3") in readme, row["name"]
    for figure in report["figures"].values():
        assert (HEADROOM / figure).stat().st_size > 0


SEARCH_V2 = REPO_ROOT / "docs" / "study" / "search_v2_mobilenet_v2"
README_SEARCH_V2_ROWS = ("uniform-3-3", "random", "hawq", "dnas-mnist", "asga-mnist", "asga-fixed-mnist", "dnas-target")


def test_the_search_v2_tables_are_the_committed_study_json():
    """The findings page quotes every row (top-1 and its paired difference with the best uniform split,
    W2/A4, the one gate.md picked on validation top-1); the README quotes the rows it names."""
    report = json.loads((SEARCH_V2 / "study.json").read_text())
    findings = (REPO_ROOT / "docs" / "studies" / "search_v2_mobilenet_v2.md").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert report["study"]["name"] == "search_v2_mobilenet_v2" and len(report["runs"]) == 11 * 3
    assert "best uniform split (by mean validation top-1): uniform-2-4" in (SEARCH_V2 / "gate.md").read_text()
    for row in report["rows"]:
        assert row["n"] == 3, row["name"]
        top1 = top1_cell(row)
        assert top1 in findings, row["name"]
        if row["name"] in (*README_SEARCH_V2_ROWS, "uniform-2-4"):
            assert top1 in readme, row["name"]
        if row["name"] == "uniform-2-4":
            continue
        cells = paired_cells(report, row["name"], "uniform-2-4")
        assert cells in findings, row["name"]
        if row["name"] in README_SEARCH_V2_ROWS:
            assert cells in readme, row["name"]
    for figure in report["figures"].values():
        assert (SEARCH_V2 / figure).stat().st_size > 0
