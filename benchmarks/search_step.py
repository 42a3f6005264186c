"""Cost of one search step per method, against one full-precision training step.

Measures, in one process, the wall time of one step of ResNet-20 (10 classes) on a batch of random
32x32 RGB inputs (128 by default):

- ``fp``: a plain full-precision SGD step of the float model;
- ``dnas``, ``seam``, ``asga``: one step of ``framework.search.step.SearchStep`` on the search
  supernet (4 candidate bit-widths per layer), with each method's config from ``conf/search/``;
- ``asga_k5``: ASGA's periodic variant, the two-pass step every 5 steps and plain steps between
  (timed over whole periods, so the mean is the per-step cost a run pays).

Two passes make 2.0x the floor for ASGA against a single-pass DNAS step; the targets are
ASGA <= 2.4x and periodic ASGA <= 1.5x of DNAS. Variants are timed in interleaved rounds and the
median per-step time is reported; on shared machines only the ratios of one run mean anything.

    .venv/bin/python benchmarks/search_step.py [--batch-size 128] [--steps 10] [--rounds 3]

The last line printed is ``ratio: asga/dnas=<x> asga_k5/dnas=<y> dnas/fp=<z>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import build_supernet, trace_layers
from framework.search.step import SearchStep


def search_config(method: str, period: int = 1):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"search={method}", "stage=search"])
    scfg = cfg.search
    with open_dict(scfg):
        scfg.sharpness.period = period
    return scfg


def build_variants(batch_size: int):
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    variants = {}

    fp = create_model("resnet20", num_classes=10, in_channels=3)
    opt = torch.optim.SGD(fp.parameters(), lr=0.01, momentum=0.9)

    def fp_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fp(x), y).backward()
        opt.step()

    variants["fp"] = (fp_step, 1)
    for name, method, period in (("dnas", "dnas", 1), ("seam", "seam", 1), ("asga", "asga", 1), ("asga_k5", "asga", 5)):
        scfg = search_config(method, period)
        model = create_model("resnet20", num_classes=10, in_channels=3)
        layers = trace_layers(model, 32, 3)
        build_supernet(model, layers, scfg.quant)
        reference = float(sum(layer.macs * 36 for layer in layers))
        step = SearchStep(model, scfg, 10, "linear", reference, torch.device("cpu"))
        variants[name] = ((lambda s=step: s((x, y))), period)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round (a multiple of 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = max(5, args.steps // 5 * 5)
    variants = build_variants(args.batch_size)
    for fn, _ in variants.values():  # warm-up (allocations, learned-range signs)
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, _ = variants[name]
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print(f"resnet20, batch {args.batch_size}x3x32x32, {args.threads} threads, {args.rounds} rounds x {steps} steps")
    print(f"{'variant':<10}{'ms/step':>10}{'x fp':>8}{'x dnas':>8}")
    for name in names:
        print(f"{name:<10}{ms[name]:>10.1f}{ms[name] / ms['fp']:>8.2f}{ms[name] / ms['dnas']:>8.2f}")
    asga, periodic = ms["asga"] / ms["dnas"], ms["asga_k5"] / ms["dnas"]
    print(f"target asga/dnas <= 2.4x: {asga:.2f}x {'PASS' if asga <= 2.4 else 'MISS'}")
    print(f"target asga_k5/dnas <= 1.5x: {periodic:.2f}x {'PASS' if periodic <= 1.5 else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"ms_per_step": ms, "rounds": times}, indent=2))
    print(f"ratio: asga/dnas={asga:.2f} asga_k5/dnas={periodic:.2f} dnas/fp={ms['dnas'] / ms['fp']:.2f}")


if __name__ == "__main__":
    main()
