"""What every benchmark shares: the machine it ran on, its result file, and peak memory of one step.

A result file (``benchmarks/results/<script>.json``, written by ``--json``) is one JSON object:

- ``schema`` (:data:`SCHEMA`), ``benchmark`` (the script's name without ``.py``), ``status``
  (``ok``, or ``skipped`` / ``failed`` with a ``reason``), ``command`` (the command line as run),
  optionally ``script`` (what the report names instead of ``<benchmark>.py``, e.g. ``tests/gpu``);
- ``machine``: :func:`machine_info` (CPU model, cores, torch version, UTC date, CUDA device name);
- ``figures``: a list of :func:`figure` dicts, each ``{name, value, unit, target, met}``, where
  ``target`` is ``{"op": "<=" | ">=" | "==", "value": limit}`` or null (a figure without a target)
  and ``met`` is whether the value meets it (null without a target or without a value);
- anything else the script measured (its raw figures: per-round times, settings), as before.

``benchmarks/report.py`` turns the files into ``BENCHMARKS.md``; ``make bench`` runs the scripts.

Peak memory (:func:`step_memory`) is the memory one training step needs on top of what is already
live before it (model, optimizer state, the batch): on the CPU the peak resident set of the process
during the step over its resident set just before (Linux: ``VmHWM`` reset through
``/proc/self/clear_refs``, ``VmRSS``, both from ``/proc/self/status``); on CUDA torch's allocator
statistics (``max_memory_allocated`` over ``memory_allocated``). The step is first warmed up (lazy
state such as momentum buffers and compiled kernels is not the step's), and freed heap memory is
handed back to the system (``malloc_trim``) so the baseline is the live memory, not what the
allocator kept. Each variant is measured in a fresh process (:func:`memory_in_fresh_process`), so
one variant's allocations neither hide nor inflate another's.

Run as a script it waits until the machine is idle (``idle``: ``scripts/bench.sh`` does before each
script), marks a result file as skipped or failed (``scripts/bench.sh`` does, so a
benchmark that did not run never leaves older figures in the report), or turns a pytest run's JUnit
XML into a result file (``scripts/gpu_check.sh``, for the tests marked ``gpu``)::

    .venv/bin/python benchmarks/common.py mark benchmarks/results/x.json --status failed --reason "..."
    .venv/bin/python benchmarks/common.py junit outputs/gpu_check/gpu_tests.xml benchmarks/results/gpu/gpu_tests.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "mpq-bench/1"
OPS = ("<=", ">=", "==")
MIB = 1024 * 1024
MEMORY_PREFIX = "memory: "  # the line a `--memory-only` run ends with (JSON after it)


class MemoryUnavailable(RuntimeError):
    """Peak memory cannot be measured here (no /proc, a kernel that cannot reset the peak)."""


# -- the machine ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (`platform.processor()` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: CPU model, usable and total cores, load average, torch and
    Python versions, the UTC date, and the CUDA device's name (null without one)."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cuda_device": cuda,
    }


# -- figures and result files ---------------------------------------------------------------------------

def meets(value: float | bool | None, op: str, limit: float | bool) -> bool | None:
    """Whether `value op limit` holds (None when there is no value)."""
    if op not in OPS:
        raise ValueError(f"unknown target operator {op!r}; use one of {', '.join(OPS)}")
    if value is None:
        return None
    if op == "<=":
        return bool(value <= limit)
    if op == ">=":
        return bool(value >= limit)
    return bool(value == limit)


def figure(name: str, value: float | bool | None, unit: str = "",
           target: tuple[str, float | bool] | None = None) -> dict[str, Any]:
    """One measured figure for the report; `target` is `(op, limit)`, e.g. `("<=", 1.10)`."""
    if isinstance(value, float) and value != value:  # NaN: nothing was measured
        value = None
    entry: dict[str, Any] = {"name": name, "value": value, "unit": unit, "target": None, "met": None}
    if target is not None:
        op, limit = target
        entry["target"] = {"op": op, "value": limit}
        entry["met"] = meets(value, op, limit)
    return entry


def round_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """`times[r] / reference[r]` for every round r: a variant against the reference timed in the same
    round."""
    if not times or len(times) != len(reference):
        raise ValueError(f"{len(times)} round times against {len(reference)} reference times: one per round each")
    return [t / ref for t, ref in zip(times, reference, strict=True)]


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """The median of :func:`round_ratios`: a variant against the reference (the full-precision step)
    timed in the same round, seconds apart.

    On a shared machine the load drifts over a run (in one `make bench` of 2026-12-03 the
    full-precision step's means in three consecutive rounds were 276, 343 and 298 ms); a slow spell
    that falls on one variant's block in one round inflates the ratio of that round only, and the
    median over rounds sets it aside, where a ratio of two medians taken over all rounds pairs blocks
    from different moments.
    """
    return float(statistics.median(round_ratios(times, reference)))


def make_result(benchmark: str, figures: list[dict[str, Any]], status: str = "ok", reason: str | None = None,
           command: Sequence[str] | None = None, **raw: Any) -> dict[str, Any]:
    """A result object (see the module docstring); `raw` holds the script's own figures."""
    out: dict[str, Any] = {
        "schema": SCHEMA, "benchmark": benchmark, "status": status,
        "command": " ".join(command if command is not None else [f"benchmarks/{benchmark}.py", *sys.argv[1:]]),
        "machine": machine_info(), "figures": figures,
    }
    if reason:
        out["reason"] = reason
    for key, value in raw.items():
        out.setdefault(key, value)
    return out


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` to `path` atomically (a `*.tmp` file beside it, then renamed): a reader never sees
    half a file, and an interrupted run leaves the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- quiet between measurements ------------------------------------------------------------------------

def process_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and its live children (psutil)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited in between
            pass
    return total


def settle(window: float = 0.2, idle: float = 0.05, limit: float = 15.0) -> float:
    """Wait until this process and its children are idle, so that work left running by one measured
    side (a DataLoader's worker processes finishing the batches they had prefetched, a loader thread
    finishing its batch) is not timed as part of the next side. Idle: less than `idle` of one core
    used over `window` seconds. Returns the seconds waited (at most about `limit`)."""
    started = time.perf_counter()
    last = process_cpu_seconds()
    while time.perf_counter() - started < limit:
        time.sleep(window)
        now = process_cpu_seconds()
        if now - last < idle * window:
            break
        last = now
    return time.perf_counter() - started


def machine_busy_fraction(window: float = 1.0) -> float:
    """The share of all cores' time not idle over `window` seconds (Linux /proc/stat, every process)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(busy: float = 0.10, limit: float = 60.0) -> tuple[float, float]:
    """Before a benchmark script: wait until the whole machine is idle (under `busy` of its cores
    over 1 s), so the processes a previous script left shutting down (Ray, DeepSpeed workers) or any
    other load are not timed with it. Returns (seconds waited, last busy fraction); gives up after
    about `limit` seconds."""
    started = time.perf_counter()
    fraction = machine_busy_fraction()
    while fraction > busy and time.perf_counter() - started < limit:
        fraction = machine_busy_fraction()
    return time.perf_counter() - started, fraction


# -- peak memory of one step ----------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError as err:
        raise MemoryUnavailable(f"cannot read /proc/self/status ({err.strerror}): peak RSS needs Linux") from None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise MemoryUnavailable(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise MemoryUnavailable(f"cannot reset the peak RSS through /proc/self/clear_refs ({err.strerror})") from None
    rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    if hwm > rss + 1024:  # the write was accepted but did nothing
        raise MemoryUnavailable(f"the kernel did not reset the peak RSS (VmHWM {hwm} kB > VmRSS {rss} kB)")


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's `malloc_trim`), so the
    resident set is what is live; elsewhere only the collection."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def step_memory(step: Callable[[], object], device: str = "cpu", warmup: int = 2, steps: int = 1) -> dict[str, Any]:
    """Peak memory of one call of `step` over the memory live before it, after `warmup` calls; with
    `steps` > 1, each of `steps` calls is measured so and the largest is kept (a periodic step's
    period).

    Returns ``{"device", "measure", "baseline_mib", "peak_mib", "step_mib"}``: the live memory before
    the step (resident set, or allocated CUDA memory), the peak during it, and their difference (the
    step's own peak). Raises :class:`MemoryUnavailable` where the peak cannot be measured.
    """
    for _ in range(warmup):
        step()
    cuda = str(device).startswith("cuda")
    worst: tuple[int, int] = (0, 0)  # (baseline, peak) in bytes of the step that needed the most
    for _ in range(max(1, steps)):
        baseline, peak = _cuda_step_peak(step, device) if cuda else _cpu_step_peak(step)
        if peak - baseline >= worst[1] - worst[0]:
            worst = (baseline, peak)
    baseline, peak = worst
    return {"device": str(device), "measure": "cuda allocated" if cuda else "cpu rss", "baseline_mib": baseline / MIB,
            "peak_mib": peak / MIB, "step_mib": (peak - baseline) / MIB}


def _cpu_step_peak(step: Callable[[], object]) -> tuple[int, int]:
    """(resident set before, peak resident set during) one call of `step`, in bytes."""
    _release_free_memory()
    _reset_peak_rss()
    baseline = _status_kib("VmRSS") * 1024
    step()
    return baseline, max(_status_kib("VmHWM") * 1024, baseline)


def _cuda_step_peak(step: Callable[[], object], device: str) -> tuple[int, int]:
    """(allocated CUDA memory before, peak allocated during) one call of `step`, in bytes."""
    import torch

    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    step()
    torch.cuda.synchronize(dev)
    return baseline, max(torch.cuda.max_memory_allocated(dev), baseline)


def print_memory(variant: str, measured: dict[str, Any]) -> None:
    """The last line of a `--memory-only` run: what :func:`memory_in_fresh_process` reads."""
    print(MEMORY_PREFIX + json.dumps({"variant": variant, **measured}), flush=True)


def memory_in_fresh_process(script: Path, variant: str, args: Sequence[str], timeout: float = 600) -> dict[str, Any]:
    """Run `script --memory-only variant *args` in a new Python process and return what it measured.

    Raises :class:`MemoryUnavailable` with the child's last error line when it measured nothing."""
    command = [sys.executable, str(script), "--memory-only", variant, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MemoryUnavailable(f"{variant}: the memory measurement took over {timeout:.0f} s") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MEMORY_PREFIX):
            return json.loads(line[len(MEMORY_PREFIX):])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    raise MemoryUnavailable(f"{variant}: {lines[-1] if lines else f'exit code {done.returncode}, no output'}")


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading a timer: waits for the CUDA device's queued work; nothing on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def add_step_options(parser: argparse.ArgumentParser, variants: Sequence[str]) -> None:
    """The options every step benchmark shares: `--device`, `--no-memory` and `--memory-only VARIANT`."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models and the batch live")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement (one fresh process per variant)")
    parser.add_argument("--memory-only", choices=list(variants), default=None, metavar="VARIANT",
                        help="measure the peak memory of one step of VARIANT in this process, print it, and stop "
                             "(what the main run starts per variant)")


def measure_memory(script: Path, variants: Sequence[str], batch_size: int, threads: int,
                   device: str) -> dict[str, dict[str, Any] | None]:
    """Each variant's step memory, each in a fresh process of `script` (None where unavailable)."""
    shared = ["--batch-size", str(batch_size), "--threads", str(threads), "--device", device]
    memory: dict[str, dict[str, Any] | None] = {}
    for name in variants:
        try:
            memory[name] = memory_in_fresh_process(script, name, shared)
        except MemoryUnavailable as err:
            print(f"memory: not measured ({err})")
            memory[name] = None
    return memory


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """`--device` must be `cpu`, or `cuda[:N]` on a machine with CUDA: else a parser error (exit 2)."""
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        parser.error(f"--device {device}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA device here")


# -- command line: mark a result file as skipped or failed; a pytest run as a result -------------------

def junit_result(xml_path: Path, benchmark: str, command: Sequence[str]) -> dict[str, Any]:
    """A result from pytest's JUnit XML (`--junitxml`): how many of the tests passed, against all of
    them, and the names of those that did not (skipped ones count as not passed)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = [f"{case.get('classname')}::{case.get('name')}" for case in cases if case.find("skipped") is not None]
    passed = len(cases) - len(failed) - len(skipped)
    figures = [figure(f"{benchmark}: tests that pass (of {len(cases)})", passed, "", ("==", len(cases)))]
    return make_result(benchmark, figures, command=command, script="tests/gpu", tests=len(cases), passed=passed,
                       failed=failed, skipped=skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a result file for a benchmark that did not run, or for a pytest run.")
    sub = parser.add_subparsers(dest="command", required=True)
    mark = sub.add_parser("mark", help="a result file with no figures and a reason (skipped or failed)")
    mark.add_argument("path", type=Path)
    mark.add_argument("--status", choices=("skipped", "failed"), required=True)
    mark.add_argument("--reason", required=True)
    mark.add_argument("--benchmark", default=None, help="default: the file name without .json")
    mark.add_argument("--run", default=None, help="the command that was (or would have been) run")
    junit = sub.add_parser("junit", help="a result file from pytest's --junitxml file")
    junit.add_argument("xml", type=Path)
    junit.add_argument("path", type=Path)
    junit.add_argument("--benchmark", default=None, help="default: the file name without .json")
    junit.add_argument("--run", default=None, help="the pytest command that was run")
    idle = sub.add_parser("idle", help="wait until the machine is idle (at most --limit seconds), print how long it took")
    idle.add_argument("--busy", type=float, default=0.10, help="the busy share of all cores that counts as idle")
    idle.add_argument("--limit", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "idle":
        waited, fraction = wait_until_idle(args.busy, args.limit)
        print(f"idle after {waited:.1f} s ({100 * fraction:.0f} % busy)" if fraction <= args.busy
              else f"still {100 * fraction:.0f} % busy after {waited:.1f} s; going on")
        return 0
    benchmark = args.benchmark or args.path.stem
    command = [args.run] if args.run else [f"benchmarks/{benchmark}.py"]
    if args.command == "junit":
        try:
            data = junit_result(args.xml, benchmark, command)
        except (OSError, ValueError) as err:  # ET.ParseError is a ValueError
            data = make_result(benchmark, [], status="failed", reason=f"no test report {args.xml}: {err}", command=command)
        write_json(args.path, data)
        return 0
    write_json(args.path, make_result(benchmark, [], status=args.status, reason=args.reason, command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
