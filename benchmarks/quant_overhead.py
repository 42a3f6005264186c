"""Training-step overhead of fake quantization: full precision vs. a fixed policy vs. the search supernet.

Measures, in one process, the wall time of one training step (forward, backward, SGD step) of
ResNet-20 (10 classes) on a batch of random 32x32 RGB inputs (128 by default) for three variants:

- ``fp``: the float model (``framework.models.create_model``);
- ``fixed``: the same model converted by ``framework.quant.quantize_model`` to a seeded mixed policy
  (first conv and last linear at 8/8 bits, every other layer a random choice from {2, 3, 4, 6} for
  weights and activations, ``numpy.random.default_rng(0)``) with the LSQ quantizers of
  ``conf/quant/lsq.yaml``;
- ``supernet``: the search supernet of ``framework.quant.build_supernet`` with 4 candidate
  bit-widths per layer and the min-max / learned-range quantizers of ``conf/quant/minmax.yaml``.

The quantizers run the kernel backend ``quant.kernels=auto`` resolves to (``framework.quant.kernels``:
on the CPU the C kernels of ``framework.quant.native``). ``--compare-backends compiled,reference``
also times ``fixed_<backend>`` and ``supernet_<backend>``, the same models with another backend, in
the same rounds (``--compare-compiled`` is ``--compare-backends compiled``).

Every variant is warmed up (which also initialises the LSQ step sizes), then the variants are timed
in interleaved rounds (the order rotates from round to round). Each variant's ratio to full
precision is the median over rounds of its round's mean step time over the full-precision step's in
the same round (``benchmarks.common.paired_ratio``), against the targets fixed <= 1.10x and
supernet <= 1.15x; the median step times over all timed steps, and their ratio, are reported too.
Absolute milliseconds depend on the machine and its load; on shared machines only the ratios
measured side by side in one run are meaningful.

Peak memory: each variant's step is then measured again in a fresh process of this script
(``--memory-only <variant>``): after the warm-up, the peak memory of one step over the memory live
before it (peak RSS on the CPU, torch's allocator statistics on CUDA; ``benchmarks/common.py``).
Target: the supernet's step <= 1.5x the full-precision step's. ``--no-memory`` skips it.

``--device cuda`` runs the models and the batch on the GPU and waits for the device before each
timer is read (``scripts/gpu_check.sh``).

Run from the repository root::

    .venv/bin/python benchmarks/quant_overhead.py
    .venv/bin/python benchmarks/quant_overhead.py --threads 1 --rounds 5 --json /tmp/overhead.json
    .venv/bin/python benchmarks/quant_overhead.py --profile   # top ops of one supernet step
    .venv/bin/python benchmarks/quant_overhead.py --compare-backends compiled,reference
    .venv/bin/python benchmarks/quant_overhead.py --device cuda --json benchmarks/results/gpu/quant_overhead.json

``--json`` writes the figures with the machine, the targets and whether each is met
(``benchmarks/common.py`` describes the file). The last line printed is
``ratio: fixed/fp=<x> supernet/fp=<y>``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import build_supernet, fixed_layer_names, kernels, quantize_model, trace_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common, when run as a script
from benchmarks.common import (  # noqa: E402
    add_step_options,
    check_device,
    cores,
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

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet20"
NUM_CLASSES = 10
IN_CHANNELS = 3
INPUT_SIZE = 32
FIXED_BITS = 8
POLICY_CHOICES = (2, 3, 4, 6)
POLICY_SEED = 0
VARIANTS = ("fp", "fixed", "supernet")
TARGETS = {"fixed": 1.10, "supernet": 1.15}  # max ratio of step time to full precision
MEMORY_TARGETS = {"supernet": 1.5}  # max ratio of a step's peak memory to full precision's
FIGURE_NAMES = {
    "fixed": "fixed mixed-policy QAT step / full-precision step",
    "supernet": "search supernet step / full-precision step",
}
STEP_NAMES = {"fp": "full-precision", "fixed": "fixed mixed-policy QAT", "supernet": "search supernet"}
COMPILED_SUFFIX = "_compiled"
BACKEND_LABELS = {"compiled": "torch.compile kernels", "reference": "reference (eager) ops", "native": "C kernels"}


@dataclass
class Variant:
    """One model under test with its optimizer and the step times measured so far (seconds)."""

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_times: list[float] = field(default_factory=list)
    round_means: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.step_times)


def default_threads() -> int:
    """The cores this process may run on."""
    return cores()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before timing (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: 3)")
    parser.add_argument("--profile", action="store_true", help="profile one supernet step and print its top ops")
    parser.add_argument("--compare-compiled", action="store_true", help="the same as --compare-backends compiled")
    parser.add_argument("--compare-backends", default="", metavar="B1,B2",
                        help="also time the fixed and supernet steps with these kernel backends (compiled, reference, "
                             "native; framework.quant.kernels) side by side in the same rounds")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    add_step_options(parser, VARIANTS)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    for name in ("threads", "batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be non-negative")
    return args


def float_model() -> nn.Module:
    return create_model(MODEL, num_classes=NUM_CLASSES, in_channels=IN_CHANNELS)


def mixed_policy(layer_names: list[str], fixed: set[str]) -> dict[str, tuple[int, int]]:
    """Fixed layers at 8/8 bits, every other layer a seeded random (w_bits, a_bits) from POLICY_CHOICES."""
    rng = np.random.default_rng(POLICY_SEED)
    bits: dict[str, tuple[int, int]] = {}
    for name in layer_names:
        if name in fixed:
            bits[name] = (FIXED_BITS, FIXED_BITS)
        else:
            w_bits, a_bits = rng.choice(POLICY_CHOICES, size=2)
            bits[name] = (int(w_bits), int(a_bits))
    return bits


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """Every variant's optimizer: multi-tensor SGD, as the framework's (framework.train.optim)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)


def quant_config(name: str):
    """The `quant` group `name` as `mpq` composes it (conf/quant/<name>.yaml builds on another file)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"quant={name}", "stage=cost"]).quant


def build_variants(names: tuple[str, ...] = VARIANTS, device: str = "cpu") -> tuple[list[Variant], dict[str, tuple[int, int]]]:
    """The models under test (`names`, each in train mode, on `device`) and the fixed variant's
    policy (empty when it is not built)."""
    variants, policy = [], {}
    if "fp" in names:
        fp = float_model().to(device)
        variants.append(Variant("fp", "full precision", fp, sgd(fp)))

    if "fixed" in names:
        fixed_model = float_model()
        layers = trace_layers(fixed_model, INPUT_SIZE, IN_CHANNELS)  # trace the float model, before converting
        policy = mixed_policy([layer.name for layer in layers], fixed_layer_names(layers, FIXED_BITS))
        quantize_model(fixed_model, policy, quant_config("lsq"), layers)
        fixed_model.to(device)
        variants.append(Variant("fixed", "fixed mixed policy, LSQ", fixed_model, sgd(fixed_model)))

    if "supernet" in names:
        supernet = float_model()
        minmax = quant_config("minmax")
        build_supernet(supernet, trace_layers(supernet, INPUT_SIZE, IN_CHANNELS), minmax)
        supernet.to(device)
        candidates = f"w{list(minmax.candidates_w)} a{list(minmax.candidates_a)}"
        variants.append(Variant("supernet", f"supernet {candidates}, min-max/learned range", supernet, sgd(supernet)))

    for variant in variants:
        variant.model.train()
    return variants, policy


def make_step(variant: Variant, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step of `variant` on the fixed batch; returns the (detached) loss. A
    `<name>_<backend>` variant runs with that kernel backend, the others with `auto`'s."""
    loss_fn = nn.CrossEntropyLoss()
    backend = variant.name.rpartition("_")[2]
    device = next(variant.model.parameters()).device
    chosen = (lambda: kernels.using(backend, device)) if backend in BACKEND_LABELS else contextlib.nullcontext

    def step() -> torch.Tensor:
        with chosen():
            variant.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(variant.model(inputs), targets)
            loss.backward()
            variant.optimizer.step()
        return loss.detach()

    return step


def backend_variants(device: str, backend: str) -> list[Variant]:
    """The fixed and supernet variants again, to run with the kernel backend `backend`."""
    variants, _ = build_variants(("fixed", "supernet"), device)
    for variant in variants:
        variant.name += f"_{backend}"
        variant.description += f", {BACKEND_LABELS[backend]}"
    return variants


def measure(variants: list[Variant], steps: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace) -> None:
    """Warm up every variant, then time them in interleaved rounds with a rotating order (on CUDA,
    each step's time ends when the device has finished it)."""
    sync = synchronizer(args.device)
    for variant in variants:
        losses = [steps[variant.name]() for _ in range(args.warmup)]
        if losses and not all(bool(torch.isfinite(loss)) for loss in losses):
            print(f"warning: {variant.name}: non-finite loss during warm-up ({[float(v) for v in losses]})")
    sync()
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            step = steps[variant.name]
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            variant.step_times.extend(times)
            variant.round_means.append(sum(times) / len(times))
        means = "  ".join(f"{v.name}={1e3 * v.round_means[-1]:.1f}ms" for v in variants)
        print(f"round {r + 1}/{args.rounds}: {means}")


def profile_step(step: Callable[[], torch.Tensor]) -> str:
    """The top 15 ops by self CPU time of one (already warmed-up) training step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


MEMORY_WARMUP = 2  # steps before the memory is measured: the LSQ initialisation and the kernels' compilation


def memory_only(args: argparse.Namespace) -> None:
    """`--memory-only VARIANT`: the peak memory of one step of that variant alone, as the last line."""
    (variant,), _ = build_variants((args.memory_only,), args.device)
    inputs = torch.randn(args.batch_size, IN_CHANNELS, INPUT_SIZE, INPUT_SIZE).to(args.device)
    targets = torch.randint(0, NUM_CLASSES, (args.batch_size,)).to(args.device)
    print_memory(variant.name, step_memory(make_step(variant, inputs, targets), args.device, warmup=MEMORY_WARMUP))


def figures_of(variants: list[Variant], ratios: dict[str, float], median_ratios: dict[str, float],
               memory: dict[str, dict | None], batch_size: int) -> list[dict]:
    """The figures of the report: time ratios (paired by round) against their targets, the ratios of
    the median step times, then the memory."""
    out = [figure(f"full-precision step ({MODEL}, batch {batch_size})", variants[0].median_ms, "ms")]
    out += [figure(f"{FIGURE_NAMES[name]} ({MODEL}, batch {batch_size})", ratios[name], "x", ("<=", limit))
            for name, limit in TARGETS.items()]
    out += [figure(f"{FIGURE_NAMES[name]}, ratio of the median step times over all rounds ({MODEL}, batch {batch_size})",
                   median_ratios[name], "x") for name in TARGETS]
    out += [figure(f"{FIGURE_NAMES[name]}, {label} instead of auto's backend ({MODEL}, batch {batch_size})",
                   ratios[f"{name}_{backend}"], "x")
            for backend, label in BACKEND_LABELS.items() for name in TARGETS if f"{name}_{backend}" in ratios]
    if memory:
        for name in VARIANTS:
            out.append(figure(f"peak memory of one {STEP_NAMES[name]} step (over the memory live before it)",
                              (memory[name] or {}).get("step_mib"), "MiB"))
        fp = (memory["fp"] or {}).get("step_mib")
        for name in ("fixed", "supernet"):
            step_mib = (memory[name] or {}).get("step_mib")
            ratio = step_mib / fp if step_mib is not None and fp else None
            limit = MEMORY_TARGETS.get(name)
            out.append(figure(f"peak memory of one {STEP_NAMES[name]} step / one full-precision step", ratio, "x",
                              ("<=", limit) if limit is not None else None))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_only:
        memory_only(args)
        return

    variants, policy = build_variants(VARIANTS, args.device)
    backends = [b for b in args.compare_backends.split(",") if b] + (["compiled"] if args.compare_compiled else [])
    for backend in dict.fromkeys(backends):
        if backend not in BACKEND_LABELS:
            raise SystemExit(f"--compare-backends: unknown backend '{backend}'; choose from {', '.join(BACKEND_LABELS)}")
        variants += backend_variants(args.device, backend)
    inputs = torch.randn(args.batch_size, IN_CHANNELS, INPUT_SIZE, INPUT_SIZE).to(args.device)
    targets = torch.randint(0, NUM_CLASSES, (args.batch_size,)).to(args.device)
    steps = {variant.name: make_step(variant, inputs, targets) for variant in variants}

    searched = [bits for name, bits in policy.items() if bits != (FIXED_BITS, FIXED_BITS)]
    print(f"{MODEL}, batch {args.batch_size}x{IN_CHANNELS}x{INPUT_SIZE}x{INPUT_SIZE}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device}; warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps")
    print(f"fixed policy (seed {POLICY_SEED}): {len(policy)} layers, first/last at {FIXED_BITS}/{FIXED_BITS}, "
          f"others mean w={np.mean([w for w, _ in searched]):.2f} a={np.mean([a for _, a in searched]):.2f} bits")

    measure(variants, steps, args)

    fp = variants[0]
    each_round = {v.name: round_ratios(v.round_means, fp.round_means) for v in variants}
    ratios = {v.name: paired_ratio(v.round_means, fp.round_means) for v in variants}
    median_ratios = {v.name: v.median_ms / fp.median_ms for v in variants}
    print()
    print(f"{'variant':<18} {'ms/step':>9} {'x fp':>6}  description (x fp in each round)")
    for v in variants:
        each = " ".join(f"{r:.2f}" for r in each_round[v.name])
        print(f"{v.name:<18} {v.median_ms:>9.1f} {ratios[v.name]:>6.2f}  {v.description} ({each})")
    print("x fp: the median of the rounds' ratios; the ratios of the median step times: "
          + ", ".join(f"{name} {median_ratios[name]:.2f}x" for name in TARGETS))
    print()
    passed = {name: ratios[name] <= limit for name, limit in TARGETS.items()}
    for name, limit in TARGETS.items():
        print(f"target {name}/fp <= {limit:.2f}x: {ratios[name]:.2f}x  {'PASS' if passed[name] else 'MISS'}")

    memory = measure_memory(Path(__file__).resolve(), VARIANTS, args.batch_size, args.threads, args.device) if args.memory else {}
    if memory:
        print()
        fp_mib = (memory["fp"] or {}).get("step_mib")
        print(f"peak memory of one step over the memory live before it ({'CUDA allocator' if args.device != 'cpu' else 'RSS'}, "
              f"each variant in a fresh process):")
        for name in VARIANTS:
            m = memory[name]
            if m is None:
                print(f"{name:<10} {'-':>9}")
                continue
            ratio = f"{m['step_mib'] / fp_mib:>6.2f}" if fp_mib else f"{'-':>6}"
            print(f"{name:<10} {m['step_mib']:>9.1f} MiB {ratio}  (before the step: {m['baseline_mib']:.1f} MiB)")
        for name, limit in MEMORY_TARGETS.items():
            step_mib = (memory[name] or {}).get("step_mib")
            if step_mib is not None and fp_mib:
                ratio = step_mib / fp_mib
                print(f"target memory {name}/fp <= {limit:.2f}x: {ratio:.2f}x  {'PASS' if ratio <= limit else 'MISS'}")

    if args.profile:
        print()
        print("profile of one supernet step (top 15 ops by self CPU time):")
        print(profile_step(steps["supernet"]))

    if args.json is not None:
        raw = {
            "model": MODEL,
            "batch_size": args.batch_size,
            "input_size": INPUT_SIZE,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "torch": torch.__version__,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "policy": {name: f"{w}/{a}" for name, (w, a) in policy.items()},  # w_bits/a_bits
            "variants": {
                v.name: {
                    "description": v.description,
                    "median_ms": v.median_ms,
                    "round_mean_ms": [1e3 * t for t in v.round_means],
                    "round_ratio_to_fp": each_round[v.name],
                    "ratio_to_fp": ratios[v.name],  # the median of the rounds' ratios
                    "median_ms_ratio_to_fp": median_ratios[v.name],
                }
                for v in variants
            },
            "targets": {name: {"max_ratio": limit, "pass": passed[name]} for name, limit in TARGETS.items()},
            "memory": memory or None,
        }
        write_json(args.json, make_result("quant_overhead", figures_of(variants, ratios, median_ratios, memory, args.batch_size), **raw))
        print(f"wrote {args.json}")

    print(f"ratio: fixed/fp={ratios['fixed']:.2f} supernet/fp={ratios['supernet']:.2f}")


if __name__ == "__main__":
    main()
