"""The README's study results are the committed study's numbers (docs/study/fmnist_resnet8/)."""

import json

from framework.paths import REPO_ROOT

STUDY = REPO_ROOT / "docs" / "study" / "fmnist_resnet8"


def test_the_readme_table_is_the_committed_study_json():
    report = json.loads((STUDY / "study.json").read_text())
    readme = (REPO_ROOT / "README.md").read_text()
    assert report["study"]["name"] == "fmnist_resnet8" and len(report["runs"]) == 12 * 3
    for row in report["rows"]:
        assert row["n"] == 3, row["name"]
        assert f"{100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}" in readme, row["name"]
    for figure in report["figures"].values():
        assert (STUDY / figure).stat().st_size > 0
        assert f"docs/study/fmnist_resnet8/{figure}" in readme
    assert (STUDY / "study.md").read_text().startswith("# Study `fmnist_resnet8`")
