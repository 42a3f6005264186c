"""scripts/test_file_totals.py: the per-file times that keep each test tier in its budget."""

import subprocess
import sys

from framework.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "test_file_totals.py"

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.unit.test_a" name="test_one" time="1.5"/>
<testcase classname="tests.unit.test_a.TestGroup" name="test_two" time="2.5"/>
<testcase classname="tests.e2e.test_b" name="test_three[x]" time="10.0"/>
<testcase classname="tests.e2e.test_b" name="test_four" time="0.25"><skipped/></testcase>
</testsuite></testsuites>
"""


def test_sums_each_file_and_lists_the_slowest_first(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(REPORT)
    out = subprocess.run([sys.executable, str(SCRIPT), str(report)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[1].split() == ["10.2", "2", "71.9%", "tests/e2e/test_b.py"]  # 10.25 s of 14.25
    assert lines[2].split() == ["4.0", "2", "28.1%", "tests/unit/test_a.py"]  # the class folds into its file
    assert lines[3].split()[:2] == ["14.2", "4"]


def test_a_missing_report_is_one_clear_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.xml")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "cannot read the JUnit report" in run.stderr and "--junitxml" in run.stderr
