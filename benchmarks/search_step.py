"""Cost of one search step per method, against one full-precision training step.

Measures, in one process, the wall time of one step of ResNet-20 (10 classes) on a batch of random
32x32 RGB inputs (128 by default):

- ``fp``: a plain full-precision SGD step of the float model;
- ``dnas``, ``seam``, ``asga``: one step of ``framework.search.step.SearchStep`` on the search
  supernet (4 candidate bit-widths per layer), with each method's config from ``conf/search/``;
- ``asga_k5``: ASGA's periodic variant, the two-pass step every 5 steps and plain steps between
  (timed over whole periods, so the mean is the per-step cost a run pays).

Two passes make 2.0x the floor for ASGA against a single-pass DNAS step. The targets are against
the full-precision step: ASGA <= 2.40x and periodic ASGA (k=5) <= 1.40x. Variants are timed in
interleaved rounds (the order rotates); each ratio is the median over rounds of the two variants'
per-step times in the same round (``benchmarks.common.paired_ratio``), and the median per-step time
over the rounds is reported beside it, with the ratio of those medians. On shared machines only the
ratios of one run mean anything.

Peak memory: each method's step is then measured again in a fresh process of this script
(``--memory-only <variant>``): after the warm-up, the peak memory of one step (for ``asga_k5`` the
largest over one period) over the memory live before it (peak RSS on the CPU, torch's allocator
statistics on CUDA; ``benchmarks/common.py``). ``--no-memory`` skips it. ``--device cuda`` runs the
steps on the GPU and waits for the device before each timer is read (``scripts/gpu_check.sh``).

    .venv/bin/python benchmarks/search_step.py [--batch-size 128] [--steps 10] [--rounds 3] [--device cpu]
    .venv/bin/python benchmarks/search_step.py --json benchmarks/results/search_step.json

``--json`` writes the figures with the machine, the targets and whether each is met. The last line
printed is ``ratio: asga/dnas=<x> asga_k5/dnas=<y> dnas/fp=<z> asga/fp=<u> asga_k5/fp=<v>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import build_supernet, trace_layers
from framework.search.step import SearchStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common, when run as a script
from benchmarks.common import (  # noqa: E402
    add_step_options,
    check_device,
    figure,
    make_result,
    measure_memory,
    paired_ratio,
    print_memory,
    round_ratios,
    step_memory,
    synchronizer,
    write_json,
)

VARIANTS = ("fp", "dnas", "seam", "asga", "asga_k5")
METHODS = {"dnas": ("dnas", 1), "seam": ("seam", 1), "asga": ("asga", 1), "asga_k5": ("asga", 5)}  # search=, period
TARGETS = {"asga": 2.40, "asga_k5": 1.40}  # max ratio of the per-step time to a full-precision step
LABELS = {"fp": "full-precision", "dnas": "DNAS search", "seam": "SEAM search", "asga": "ASGA search",
          "asga_k5": "periodic ASGA (k=5)"}


def search_config(method: str, period: int = 1):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"search={method}", "stage=search"])
    scfg = cfg.search
    with open_dict(scfg):
        scfg.sharpness.period = period
    return scfg


def build_variants(batch_size: int, device: str = "cpu", names: tuple[str, ...] = VARIANTS):
    """`{name: (step function, period)}` for `names`, with their models and the batch on `device`."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (batch_size,)).to(device)
    variants = {}

    fp = create_model("resnet20", num_classes=10, in_channels=3).to(device)
    opt = torch.optim.SGD(fp.parameters(), lr=0.01, momentum=0.9, foreach=True)  # multi-tensor, as the search's

    def fp_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fp(x), y).backward()
        opt.step()

    if "fp" in names:
        variants["fp"] = (fp_step, 1)
    for name, (method, period) in METHODS.items():
        if name not in names:
            continue
        scfg = search_config(method, period)
        model = create_model("resnet20", num_classes=10, in_channels=3)
        layers = trace_layers(model, 32, 3)
        build_supernet(model, layers, scfg.quant)
        model.to(device)
        reference = float(sum(layer.macs * 36 for layer in layers))
        step = SearchStep(model, scfg, 10, "linear", reference, torch.device(device))
        variants[name] = ((lambda s=step: s((x, y))), period)
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round (a multiple of 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    add_step_options(parser, VARIANTS)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    return args


def memory_only(args: argparse.Namespace) -> None:
    """`--memory-only VARIANT`: the peak memory of one step of that variant alone (for the periodic
    one, warmed up over one period, the largest over the next), as the last line."""
    fn, period = build_variants(args.batch_size, args.device, (args.memory_only,))[args.memory_only]
    print_memory(args.memory_only, step_memory(fn, args.device, warmup=max(2, period), steps=period))


def figures_of(ms: dict[str, float], over_fp: dict[str, float], over_dnas: dict[str, float],
               memory: dict[str, dict | None], batch_size: int) -> list[dict]:
    """The figures of the report: per-step time ratios paired by round (the targets' against full
    precision), the ratios of the median times for the targets' variants, then each method's step
    memory."""
    out = [figure(f"full-precision step (resnet20, batch {batch_size})", ms["fp"], "ms")]
    for name in VARIANTS[1:]:
        limit = TARGETS.get(name)
        out.append(figure(f"{LABELS[name]} step / full-precision step (resnet20, batch {batch_size})",
                          over_fp[name], "x", ("<=", limit) if limit is not None else None))
    for name in TARGETS:
        out.append(figure(f"{LABELS[name]} step / full-precision step, ratio of the median step times over all rounds "
                          f"(resnet20, batch {batch_size})", ms[name] / ms["fp"], "x"))
    out.append(figure("ASGA search step / DNAS search step", over_dnas["asga"], "x"))
    out.append(figure("periodic ASGA (k=5) step / DNAS search step", over_dnas["asga_k5"], "x"))
    for name in VARIANTS if memory else ():
        out.append(figure(f"peak memory of one {LABELS[name]} step (over the memory live before it)",
                          (memory[name] or {}).get("step_mib"), "MiB"))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return
    sync = synchronizer(args.device)
    steps = max(5, args.steps // 5 * 5)
    variants = build_variants(args.batch_size, args.device)
    for fn, _ in variants.values():  # warm-up (allocations, learned-range signs)
        for _ in range(2):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, _ = variants[name]
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    over_fp = {name: paired_ratio(times[name], times["fp"]) for name in names}
    over_dnas = {name: paired_ratio(times[name], times["dnas"]) for name in names}
    print(f"resnet20, batch {args.batch_size}x3x32x32, {args.threads} threads, {args.device}, {args.rounds} rounds x {steps} steps")
    print(f"{'variant':<10}{'ms/step':>10}{'x fp':>8}{'x dnas':>8}  x fp in each round")
    for name in names:
        each = "".join(f"{r:>6.2f}" for r in round_ratios(times[name], times["fp"]))
        print(f"{name:<10}{ms[name]:>10.1f}{over_fp[name]:>8.2f}{over_dnas[name]:>8.2f}  {each}")
    print("x fp, x dnas: the median of the rounds' ratios; the ratios of the median step times: "
          + ", ".join(f"{name}/fp {ms[name] / ms['fp']:.2f}x" for name in TARGETS))
    asga, periodic = over_dnas["asga"], over_dnas["asga_k5"]
    for name, limit in TARGETS.items():
        ratio = over_fp[name]
        print(f"target {name}/fp <= {limit:.2f}x: {ratio:.2f}x {'PASS' if ratio <= limit else 'MISS'}")

    memory = measure_memory(Path(__file__).resolve(), VARIANTS, args.batch_size, args.threads, args.device) if args.memory else {}
    if memory:
        print(f"peak memory of one step over the memory live before it ({'CUDA allocator' if args.device != 'cpu' else 'RSS'}, "
              f"each variant in a fresh process):")
        for name in VARIANTS:
            m = memory[name]
            print(f"{name:<10}" + (f"{m['step_mib']:>10.1f} MiB  (before the step: {m['baseline_mib']:.1f} MiB)" if m else f"{'-':>10}"))
    if args.json:
        write_json(args.json, make_result(
            "search_step", figures_of(ms, over_fp, over_dnas, memory, args.batch_size), ms_per_step=ms, rounds=times,
            ratio_to_fp=over_fp, median_ms_ratio_to_fp={name: ms[name] / ms["fp"] for name in names},
            batch_size=args.batch_size, steps=steps, rounds_count=args.rounds, threads=args.threads, device=args.device,
            memory=memory or None))
        print(f"wrote {args.json}")
    print(f"ratio: asga/dnas={asga:.2f} asga_k5/dnas={periodic:.2f} dnas/fp={over_fp['dnas']:.2f} "
          f"asga/fp={over_fp['asga']:.2f} asga_k5/fp={over_fp['asga_k5']:.2f}")


if __name__ == "__main__":
    main()
