"""The headroom gate of a study without a search (`study=headroom_resnet8`): does any allocation beat
the best uniform split?

The best uniform split is chosen among the study's `uniform-*` rows by mean **validation** top-1
(held-out training images; never the test split). Every other row is then compared with it on the
test split, paired by seed: the mean difference, its 95 % t interval (framework.stats), and the
gate of the issue that asked for the study: a row passes when its mean difference is at least
max(0.3 points, 2 x the pooled per-seed standard deviation of the two rows) and the interval lies
above 0. Validation top-1 comes from each run's record (`val_top1`) or, for runs recorded without
it, from its `finetune/result.json`. Where the study has several rows of random policies (sources
`random:<seed>`, `random:<seed + n>`), a pooled row `random (pooled)` compares their per-seed mean:
the mean over every random policy, still paired by seed.

    .venv/bin/python benchmarks/headroom_gate.py outputs/study/headroom_resnet8
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

from framework.stats import paired_difference

#: the row of the per-seed mean over every random-policy row
POOLED = "random (pooled)"


def _val_top1(folder: Path, run: dict) -> float | None:
    if run.get("val_top1") is not None:
        return float(run["val_top1"])
    result = folder / run["dir"] / "finetune" / "result.json"
    if not result.exists():
        return None
    history = json.loads(result.read_text()).get("history") or [{}]
    value = history[-1].get("val_top1")
    return None if value is None else float(value)


def gate(folder: Path) -> dict:
    if not (folder / "study.json").is_file():
        raise SystemExit(f"error: {folder} has no study.json; finish the study first "
                         f"(`mpq study study={folder.name}` resumes it and writes the report)")
    report = json.loads((folder / "study.json").read_text())
    by_row: dict[str, dict[int, dict]] = {}
    for run in report["runs"]:
        by_row.setdefault(run["row"], {})[int(run["seed"])] = {"test": float(run["top1"]), "val": _val_top1(folder, run)}
    randoms = [row["name"] for row in report.get("rows", []) if str(row.get("source", "")).startswith("random:<seed")]
    if len(randoms) > 1:
        shared = set.intersection(*(set(by_row[row]) for row in randoms))
        by_row[POOLED] = {seed: {"test": mean(by_row[row][seed]["test"] for row in randoms), "val": None}
                          for seed in sorted(shared)}
    uniform = [row for row in by_row if row.startswith("uniform")]
    if not uniform:
        raise SystemExit(f"{folder}: no uniform-* row to measure headroom against")
    best = max(uniform, key=lambda row: mean(v["val"] for v in by_row[row].values() if v["val"] is not None))
    out = {"best_uniform": best, "selected_by": "mean validation top-1", "rows": [],
           "pooled_random": randoms if len(randoms) > 1 else []}
    for row, seeds in by_row.items():
        if row == best:
            continue
        shared = sorted(set(seeds) & set(by_row[best]))
        a, b = [seeds[s]["test"] for s in shared], [by_row[best][s]["test"] for s in shared]
        paired = paired_difference(a, b)
        pooled = math.sqrt((stdev(a) ** 2 + stdev(b) ** 2) / 2) if len(shared) > 1 else float("nan")
        threshold = max(0.003, 2 * pooled)
        passes = paired["mean"] >= threshold and paired["low"] is not None and paired["low"] > 0
        out["rows"].append({"row": row, "n": paired["n"], "mean": paired["mean"], "low": paired["low"],
                            "high": paired["high"], "pooled_std": pooled, "threshold": threshold, "passes": passes,
                            "verdict": paired["verdict"]})
    return out


def main(folder: str) -> None:
    result = gate(Path(folder))
    print(f"best uniform split (by {result['selected_by']}): {result['best_uniform']}\n")
    print("| row | seeds | minus best uniform (test, points) | 95 % interval | gate threshold | passes |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['row']} | {r['n']} | {100 * r['mean']:+.2f} | [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] | "
              f"{100 * r['threshold']:.2f} | {'yes' if r['passes'] else 'no'} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/study/headroom_resnet8")
