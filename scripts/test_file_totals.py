"""Per-file wall time of a test run, from the JUnit XML report pytest writes (`--junitxml`).

    python scripts/test_file_totals.py outputs/tests/junit.xml [--top 30]

Prints one line per test file, slowest first: the seconds its tests took (setup, call and teardown,
pytest's default `junit_duration_report`), how many ran, and the share of the whole run. This is what
keeps each tier in its budget: `make test` under 10 minutes, `make test-all` under 45 (README, Tests).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def file_totals(report: Path) -> dict[str, tuple[float, int]]:
    """{test file: (seconds, test count)} of one JUnit XML report."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError) as err:
        raise SystemExit(f"error: cannot read the JUnit report {report}: {err}; "
                         "run the tests with --junitxml=<file> first (scripts/run_tests.sh does)") from None
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for case in root.iter("testcase"):
        # classname is the dotted module path plus any class: tests.unit.test_x[.TestY]
        parts = case.get("classname", "").split(".")
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        name = "/".join(parts[: module + 1]) + ".py"
        totals[name][0] += float(case.get("time", 0.0))
        totals[name][1] += 1
    return {name: (seconds, count) for name, (seconds, count) in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--top", type=int, default=0, help="only the N slowest files (0: all)")
    args = parser.parse_args(argv)
    totals = file_totals(args.report)
    whole = sum(seconds for seconds, _ in totals.values()) or 1.0
    print(f"{'seconds':>8}  {'tests':>5}  {'share':>6}  file")
    for name, (seconds, count) in sorted(totals.items(), key=lambda item: -item[1][0])[: args.top or None]:
        print(f"{seconds:8.1f}  {count:5d}  {100 * seconds / whole:5.1f}%  {name}")
    print(f"{whole:8.1f}  {sum(count for _, count in totals.values()):5d}  100.0%  (all files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
