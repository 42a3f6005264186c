"""How much a fine-tuned top-1 moves with the seed and the kernel backend: the spread that decides
whether `make run`'s "searched minus baseline" line means anything.

Given the run directory of an `mpq pipeline` (its `pretrain/` checkpoint and `finetune/policy.json`),
fine-tunes and evaluates the searched policy and the baseline (`uniform-budget`) once per seed and
per variant (a set of overrides, e.g. a kernel backend), each pair with the same seed (the same data
order: a paired comparison), and prints top-1 per run, the mean and sample standard deviation per
policy and variant, and the paired differences searched - baseline with their mean and standard
deviation. Each run is `mpq finetune` then `mpq evaluate` in a fresh process.

Run from the repository root (about 25 s per fine-tune on 2 cores)::

    .venv/bin/python benchmarks/finetune_spread.py --run outputs/pipeline/<run> --seeds 0 1 2 \\
        --variant native:quant.kernels=native --variant reference:quant.kernels=reference \\
        --json /tmp/spread.json

`--repo PATH` runs another checkout's `mpq` (same virtual environment, its own code and configs),
to compare a change with the code before it; `--baseline-only`/`--searched-only` halve the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an `mpq pipeline` run directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                        help="a named set of overrides (repeatable); default: one variant with none")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run (e.g. finetune.max_steps=240)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `mpq` runs (default: this one)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: <run>/spread)")
    parser.add_argument("--searched-only", action="store_true")
    parser.add_argument("--baseline-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def mpq(repo: Path, stage: str, run_dir: Path, overrides: list[str]) -> dict:
    """`mpq <stage>` of `repo` in a fresh process; its result.json (reused when it finished before).
    An override `env.NAME=VALUE` sets an environment variable instead (for an older checkout's knobs)."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        done = json.loads(result_file.read_text())
        if done.get("status") == "ok":
            return done
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_USAGE_STATS_ENABLED": "0", "AIM_UI_TELEMETRY_ENABLED": "0"}
    env.setdefault("MPQ_DATA_ROOT", str(REPO / "data"))
    env.update(o[4:].split("=", 1) for o in overrides if o.startswith("env."))
    overrides = [o for o in overrides if not o.startswith("env.")]
    proc = subprocess.run([sys.executable, "-m", "launchers.cli", stage, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mpq {stage} failed in {run_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(result_file.read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    run = args.run.resolve()
    checkpoint = run / "pretrain" / "checkpoints" / "last"
    policy_file = run / "finetune" / "policy.json"  # the policy the pipeline fine-tuned (searched or swept)
    for path in (checkpoint, policy_file):
        if not path.exists():
            raise SystemExit(f"{path} is missing: --run must be the directory of an `mpq pipeline` run")
    variants = []
    for spec in args.variant or ["default:"]:
        name, _, rest = spec.partition(":")
        variants.append((name, [o for o in rest.split(",") if o]))
    policies = [("searched", str(policy_file)), ("baseline", "uniform-budget")]
    if args.searched_only:
        policies = policies[:1]
    if args.baseline_only:
        policies = policies[1:]
    out = (args.out or run / "spread").resolve()
    rows = []
    started = time.time()
    for name, overrides in variants:
        for seed in args.seeds:
            for label, policy in policies:
                folder = out / name / f"seed{seed}" / label
                common = [f"seed={seed}", "tracking.enabled=false", *overrides, *args.extra]
                fine = mpq(args.repo, "finetune", folder / "finetune",
                           [f"init_checkpoint={checkpoint}", f"policy={policy}", *common])
                evaluated = mpq(args.repo, "evaluate", folder / "evaluate",
                                [f"checkpoint={fine['artifacts']['checkpoint']}", *common])
                rows.append({"variant": name, "seed": seed, "policy": label, "top1": evaluated["metrics"]["top1"],
                             "kernels": fine.get("kernels")})
                print(f"{name:>12} seed {seed} {label:>8}: top-1 {100 * evaluated['metrics']['top1']:.2f} %", flush=True)
    summary = {}
    print("\nvariant       policy     mean top-1 %   std (seeds)   n")
    for name, _ in variants:
        for label, _ in policies:
            values = [100 * r["top1"] for r in rows if r["variant"] == name and r["policy"] == label]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[f"{name}/{label}"] = {"mean": statistics.mean(values), "std": std, "values": values}
            print(f"{name:<13} {label:<10} {statistics.mean(values):10.2f} {std:13.2f} {len(values):5d}")
        if len(policies) == 2:
            diffs = [100 * (a["top1"] - b["top1"]) for a in rows for b in rows
                     if a["variant"] == b["variant"] == name and a["seed"] == b["seed"]
                     and a["policy"] == "searched" and b["policy"] == "baseline"]
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            summary[f"{name}/searched-baseline"] = {"mean": statistics.mean(diffs), "std": std, "values": diffs}
            print(f"{name:<13} {'searched - baseline (paired)':<28} {statistics.mean(diffs):+.2f} ± {std:.2f}: "
                  + ", ".join(f"{d:+.2f}" for d in diffs))
    print(f"\n{len(rows)} fine-tunes in {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"run": str(run), "extra": args.extra, "rows": rows, "summary": summary},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
