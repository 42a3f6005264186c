"""Parallel proxy searches: the same trials one after another, then through `mpq sweep`.

Measures, in one run, the wall time of ``--trials`` proxy searches (default 4: ``search=asga`` on a
class-balanced MNIST proxy, seeds 0..3, from a full-precision ResNet-8 of Fashion-MNIST), each with
one CPU (one torch thread), three ways:

- ``serial``: one ``mpq search ... seed=N threads=1`` after another, each its own process, which is
  how the searches run without a sweep (each pays its start-up: imports, compiling the fused
  quantization kernels from the disk cache);
- ``in-process`` (the strict baseline, ``--no-in-process`` skips it): the same trial configs run one
  after another in this one process by ``framework.search.loop.run_search``, so no start-up at all
  is counted;
- ``sweep``: ``framework.tune.sweep.run_sweep`` end to end: Ray started in this process on
  127.0.0.1 with 2 CPUs, the trials as Ray Tune trials with ``tune.cpus_per_trial=1`` and
  ``tune.max_concurrent=2`` (FIFO, so every trial does all its steps, as on the other sides), the
  selection and its files, and Ray's shutdown.

All sides run the same steps on the same data with the same seeds, so their proxy top-1 must agree
trial by trial (printed: it shows each side did the same work). One untimed search of 2 steps comes
first, so no side pays for cold disk caches (datasets, compiled kernels). A full-precision
checkpoint is trained first unless ``--checkpoint`` gives one (not timed).

The speed-up is serial / sweep. Two trials at a time on 2 cores is at most 2x, less what two
processes slow each other down by on this machine (shared caches and memory: 2-15 % here, measured
with two 1-thread matrix products), less Ray's start-up and the workers' imports; so the trials are
made long enough (25-35 s each) for those costs to matter little. **Target: >= 1.7x**, on
an otherwise idle 2-core machine.

    .venv/bin/python benchmarks/sweep_parallel.py
    .venv/bin/python benchmarks/sweep_parallel.py --trials 4 --per-class 150 --batch-size 50 --epochs 4 \
        --method asga --checkpoint outputs/pretrain/<run>/checkpoints/last --json /tmp/sweep_parallel.json

``--json`` writes the figures with the machine, the target and whether it is met
(``benchmarks/common.py``). The last line printed is
``ratio: speedup=<serial / sweep> in_process=<in-process / sweep>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common, when run as a script
from benchmarks.common import figure, make_result, write_json  # noqa: E402

TARGET = 1.7


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="searches (seeds 0..trials-1)")
    parser.add_argument("--method", default="asga", help="a conf/search/ entry")
    parser.add_argument("--per-class", type=int, default=150, help="proxy images per class (MNIST)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--test-fraction", type=float, default=0.05, help="of the proxy's test split, for validation")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once in the sweep (1 CPU each)")
    parser.add_argument("--checkpoint", default=None, help="full-precision checkpoint (default: train one first)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the in-process baseline")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    if args.trials < 1 or args.concurrency < 1 or args.epochs < 1:
        parser.error("--trials, --concurrency and --epochs must be >= 1")
    return args


def compose(stage: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from framework.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[*overrides, f"stage={stage}"])


def pretrain(root: Path) -> str:
    from framework.stages.pretrain import run_pretrain

    cfg = compose("pretrain", ["data.fraction=0.05", "data.test_fraction=0.05", "train.max_steps=40",
                               "tracking.enabled=false", f"run_dir={root / 'pretrain'}"])
    return run_pretrain(cfg).artifacts["checkpoint"]


def common_overrides(args: argparse.Namespace, checkpoint: str) -> list[str]:
    """What every trial shares, as `mpq` overrides (the sweep adds its space; `mpq search` the seed)."""
    return [f"init_checkpoint={checkpoint}", f"search={args.method}", f"search.epochs={args.epochs}",
            f"search.batch_size={args.batch_size}", f"proxy.per_class={args.per_class}",
            f"proxy.test_fraction={args.test_fraction}", "tracking.enabled=false"]


def sweep_config(args: argparse.Namespace, checkpoint: str, run_dir: Path, *extra: str):
    cfg = compose("sweep", [
        *common_overrides(args, checkpoint), "~tune.space", f"+tune.space={{seed: {{range: [0, {args.trials}]}}}}",
        "tune.cpus_per_trial=1", f"tune.max_concurrent={args.concurrency}", f"tune.num_cpus={args.concurrency}",
        "tune.scheduler.name=fifo", *extra,
    ])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def run_mpq_search(args: argparse.Namespace, checkpoint: str, overrides: dict, run_dir: Path) -> dict:
    """One `mpq search` process with the trial's overrides and one thread; its result.json."""
    from framework.paths import REPO_ROOT

    command = [sys.executable, "-m", "launchers.cli", "search", *common_overrides(args, checkpoint),
               *(f"{k}={v}" for k, v in overrides.items()), "threads=1", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"mpq search failed: {done.stderr[-2000:]}")
    return json.loads((run_dir / "result.json").read_text())


def main() -> int:
    args = parse_args()
    import torch

    from framework.search.loop import run_search
    from framework.tune.plan import make_plan
    from framework.tune.sweep import run_sweep
    from framework.tune.trial import TrialContext

    root = args.keep or Path(tempfile.mkdtemp(prefix="sweep_parallel_"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, ray {metadata.version('ray')}, {os.cpu_count()} cores, load average {load:.2f}; "
          f"runs in {root}")
    checkpoint = args.checkpoint or pretrain(root)
    torch.set_num_threads(1)

    warm = sweep_config(args, checkpoint, root / "warmup")
    warm_plan = make_plan(warm)
    warm_cfg = TrialContext(warm_plan.base, warm_plan.methods, str(root / "warmup"), "bench", 1).config(warm_plan.trials[0])
    with open_dict(warm_cfg):
        warm_cfg.search.max_steps = 2
    run_search(warm_cfg)

    plan = make_plan(sweep_config(args, checkpoint, root / "in_process"))
    serial: dict[str, dict] = {}
    started = time.perf_counter()
    for trial in plan.trials:
        t0 = time.perf_counter()
        result = run_mpq_search(args, checkpoint, trial.overrides, root / "serial" / trial.key)
        serial[trial.key] = {"seconds": time.perf_counter() - t0, "proxy_top1": result["metrics"]["proxy_top1"],
                             "steps": result["metrics"]["steps"], "overrides": trial.overrides}
    serial_seconds = time.perf_counter() - started

    in_process: dict[str, dict] = {}
    in_process_seconds = None
    if args.in_process:
        context = TrialContext(plan.base, plan.methods, str(root / "in_process"), "bench", 1)
        started = time.perf_counter()
        for trial in plan.trials:
            t0 = time.perf_counter()
            result = run_search(context.config(trial))
            in_process[trial.key] = {"seconds": time.perf_counter() - t0, "proxy_top1": result.metrics["proxy_top1"]}
        in_process_seconds = time.perf_counter() - started

    started = time.perf_counter()
    swept = run_sweep(sweep_config(args, checkpoint, root / "sweep"))
    sweep_seconds = time.perf_counter() - started
    rows = {row["key"]: row for row in swept.extra["trials"]}

    speedup = serial_seconds / sweep_seconds
    strict = in_process_seconds / sweep_seconds if in_process_seconds else None
    same = all(rows[k]["status"] == "finished" and rows[k]["proxy_top1"] == serial[k]["proxy_top1"]
               and (not in_process or in_process[k]["proxy_top1"] == serial[k]["proxy_top1"]) for k in serial)
    print(f"\n{len(plan.trials)} trials ({args.method}, {args.per_class} images per class, batch {args.batch_size}, "
          f"{args.epochs} epochs, {next(iter(serial.values()))['steps']} steps each), 1 CPU each; load average before: {load:.2f}")
    print(f"  {'trial':<14}{'overrides':<10}{'mpq search (s)':>16}{'in-process (s)':>16}   proxy top-1 (all sides)")
    for key, s in serial.items():
        inproc = f"{in_process[key]['seconds']:.1f}" if in_process else "-"
        print(f"  {key:<14}{' '.join(f'{k}={v}' for k, v in s['overrides'].items()):<10}{s['seconds']:>16.1f}{inproc:>16}"
              f"   {100 * s['proxy_top1']:.2f} %")
    print(f"  serial, one mpq search after another:  {serial_seconds:8.1f} s")
    if in_process_seconds:
        print(f"  in-process, one after another:         {in_process_seconds:8.1f} s   (no start-up counted)")
    print(f"  sweep, {args.concurrency} at a time (Ray Tune):        {sweep_seconds:8.1f} s   (Ray start-up and shutdown included)")
    print(f"  same proxy top-1 on every side:        {'yes' if same else 'NO'}")
    print(f"  speed-up {speedup:.2f}x over the mpq search loop (target >= {TARGET}x: {'met' if speedup >= TARGET else 'NOT met'})"
          + (f", {strict:.2f}x over the in-process loop" if strict else ""))
    if args.json:
        what = f"{len(plan.trials)} {args.method} searches, {args.concurrency} at a time"
        figures = [figure(f"sweep speed-up: serial mpq search loop / mpq sweep wall time ({what})", speedup, "x",
                          (">=", TARGET)),
                   figure("same proxy top-1 for every trial on every side", same, "", ("==", True))]
        if strict:
            figures.insert(1, figure(f"in-process loop / mpq sweep wall time ({what})", strict, "x"))
        write_json(args.json, make_result(
            "sweep_parallel", figures, serial_seconds=serial_seconds, in_process_seconds=in_process_seconds,
            sweep_seconds=sweep_seconds, speedup=speedup, speedup_in_process=strict, same_results=same, trials=serial,
            in_process=in_process, args={k: str(v) for k, v in vars(args).items()}))
    print(f"ratio: speedup={speedup:.2f}" + (f" in_process={strict:.2f}" if strict else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
