"""BENCHMARKS.md from the benchmarks' result files: every figure, its target, and whether it is met.

Reads ``benchmarks/results/*.json`` (what each script writes with ``--json``; the format is in
``benchmarks/common.py``) and ``benchmarks/results/gpu/*.json`` (``scripts/gpu_check.sh``), and writes
one Markdown table per machine: figure, measured value, target, met (yes / no / no target), script.
A script of ``benchmarks/`` with no result file is listed too, with why (some need another run's
outputs, see :data:`NOT_RUN`); a skipped or failed script shows its reason, never a figure.
:func:`render` is a pure function of the loaded results, so the tests give it hand-made ones.

    .venv/bin/python benchmarks/report.py                       # benchmarks/results -> BENCHMARKS.md
    .venv/bin/python benchmarks/report.py --results DIR --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
HELPERS = ("common", "report")  # modules of benchmarks/ that are not benchmarks
ORDER = ("gpu_tests", "quant_overhead", "search_step", "loaders", "ddp_scaling", "sweep_parallel", "onnx_bias", "search_decisiveness")
NOT_RUN = {
    "search_decisiveness": "not run by make bench (needs a study's outputs: `.venv/bin/python "
                           "benchmarks/search_decisiveness.py outputs/study/<name>`)",
    "onnx_bias": "not run by make bench (needs an exported model: `.venv/bin/python benchmarks/onnx_bias.py "
                 "--packed outputs/pipeline/<run>/export/model.safetensors`)",
}
RERUN = """\
    make bench                                            # every script (about 10 minutes on 2 cores), then this file
    MPQ_BENCH_ONLY="quant_overhead loaders" make bench    # some scripts only; the others' results are kept
    .venv/bin/python benchmarks/quant_overhead.py --json benchmarks/results/quant_overhead.json   # one script
    .venv/bin/python benchmarks/report.py                 # this file again, from benchmarks/results/
    bash scripts/gpu_check.sh                             # on a CUDA machine: the gpu tests, the GPU section"""


# -- formatting -----------------------------------------------------------------------------------------

def format_value(value: Any, unit: str = "") -> str:
    """A measured value with its unit, to the precision its unit deserves."""
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "no"
    digits = {"ms": 1, "MiB": 1, "images/s": 0, "s": 1}
    if unit == "x":
        return f"{float(value):.2f}x"
    if unit in digits:
        return f"{float(value):.{digits[unit]}f} {unit}"
    if isinstance(value, int):
        return f"{value} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def format_target(target: Mapping[str, Any] | None, unit: str = "") -> str:
    if not target:
        return "-"
    if target["op"] == "==":
        return format_value(target["value"], unit)
    return f"{target['op']} {format_value(target['value'], unit)}"


def format_met(entry: Mapping[str, Any]) -> str:
    if not entry.get("target"):
        return "-"
    if entry.get("met") is None:
        return "not measured"
    return "yes" if entry["met"] else "**no**"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def machine_line(machine: Mapping[str, Any]) -> str:
    """CPU model, cores, torch and Python, the CUDA device if any."""
    parts = [f"{machine.get('cpu_model', 'unknown CPU')}, {machine.get('cores', '?')} cores"
             + (f" (of {machine['cpu_count']})" if machine.get("cpu_count") not in (None, machine.get("cores")) else ""),
             f"torch {machine.get('torch', '?')}", f"Python {machine.get('python', '?')}"]
    if machine.get("cuda_device"):
        parts.insert(1, f"GPU {machine['cuda_device']}")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return ", ".join(parts)


# -- the report -----------------------------------------------------------------------------------------

def _script(name: str, res: Mapping[str, Any] | None) -> str:
    return f"`{(res or {}).get('script') or name + '.py'}`"


def _ordered(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def table(results: list[Mapping[str, Any]], scripts: Iterable[str] = (), not_run: Mapping[str, str] = NOT_RUN) -> list[str]:
    """The Markdown table of every figure of `results`, plus a row per script of `scripts` without one."""
    by_name = {str(r.get("benchmark")): r for r in results}
    lines = ["| figure | measured | target | met | script |", "|---|---|---|---|---|"]
    for name in _ordered([*by_name, *scripts]):
        res = by_name.get(name)
        script = _script(name, res)
        if res is None:
            why = not_run.get(name, "no results yet (run `make bench`)")
            lines.append(f"| - | {_cell(why)} | - | - | {script} |")
            continue
        status = res.get("status", "ok")
        if status != "ok":
            lines.append(f"| - | {_cell(f'{status}: ' + str(res.get('reason') or 'no reason given'))} | - | - | {script} |")
            continue
        figures = res.get("figures") or []
        if not figures:
            lines.append(f"| - | no figures in the result file | - | - | {script} |")
        for entry in figures:
            unit = entry.get("unit", "")
            lines.append(f"| {_cell(entry['name'])} | {_cell(format_value(entry.get('value'), unit))} | "
                         f"{_cell(format_target(entry.get('target'), unit))} | {format_met(entry)} | {script} |")
    return lines


def summary(results: list[Mapping[str, Any]]) -> str:
    """"N of M targets met", with the targets not measured and the scripts that gave no figures."""
    targets = [f for r in results if r.get("status", "ok") == "ok" for f in r.get("figures") or [] if f.get("target")]
    met = sum(1 for f in targets if f.get("met") is True)
    missing = sum(1 for f in targets if f.get("met") is None)
    text = f"{met} of {len(targets)} targets met" + (f", {missing} not measured" if missing else "")
    others = [f"{_script(str(r.get('benchmark')), r)} ({r.get('status')})" for r in results if r.get("status", "ok") != "ok"]
    return text + (f"; no figures from {', '.join(others)}." if others else ".")


def machines(results: list[Mapping[str, Any]]) -> list[str]:
    """One line per distinct machine, with the scripts that ran on it."""
    groups: dict[str, list[str]] = {}
    for res in results:
        if res.get("machine"):
            groups.setdefault(machine_line(res["machine"]), []).append(str(res.get("benchmark")))
    if len(groups) == 1:
        return [f"Machine: {next(iter(groups))}."]
    by_name = {str(r.get("benchmark")): r for r in results}
    return ["Machines:", "", *(f"- {line}: {', '.join(_script(n, by_name.get(n)) for n in _ordered(names))}"
                               for line, names in groups.items())]


def runs(results: list[Mapping[str, Any]]) -> list[str]:
    """When and how each script ran (its command line, the load average at its start)."""
    lines = []
    for name in _ordered(str(r.get("benchmark")) for r in results):
        res = next(r for r in results if str(r.get("benchmark")) == name)
        machine = res.get("machine") or {}
        load = f", load average {machine['load_average']}" if machine.get("load_average") is not None else ""
        lines.append(f"- {_script(name, res)} ({res.get('status', 'ok')}, {machine.get('date', 'date unknown')}{load}): "
                     f"`{res.get('command', '?')}`")
    return lines


def section(results: list[Mapping[str, Any]], scripts: Iterable[str] = (), not_run: Mapping[str, str] = NOT_RUN) -> list[str]:
    lines = [*machines(results), "", *table(results, scripts, not_run), "", summary(results)]
    if results:
        lines += ["", "Runs:", "", *runs(results)]
    return lines


def render(results: list[Mapping[str, Any]], scripts: Iterable[str] = (), gpu: list[Mapping[str, Any]] | None = None,
           not_run: Mapping[str, str] = NOT_RUN) -> str:
    """BENCHMARKS.md from the CPU `results`, the names of all `scripts` of benchmarks/, and the `gpu` results."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/report.py` from `benchmarks/results/*.json` (`make bench`); do not edit by hand.",
        "Ratios are measured side by side in one run; absolute times depend on the machine and its load.",
        "Peak memory is one step's peak over the memory live before it, each variant in a fresh process.",
        "",
        "## CPU",
        "",
        *section(results, scripts, not_run),
        "",
    ]
    gpu = list(gpu or [])
    names = sorted({str((r.get("machine") or {}).get("cuda_device")) for r in gpu if (r.get("machine") or {}).get("cuda_device")})
    if gpu:
        lines += [f"## GPU: {', '.join(names) or 'unknown device'}", "",
                  "Written by `scripts/gpu_check.sh` into `benchmarks/results/gpu/`.", "",
                  *section(gpu, (), {}), ""]
    else:
        lines += ["## GPU", "", "No GPU results yet: `bash scripts/gpu_check.sh` on a CUDA machine writes them "
                  "(`benchmarks/results/gpu/`).", ""]
    lines += ["## Rerun", "", RERUN, ""]
    return "\n".join(lines)


# -- files ----------------------------------------------------------------------------------------------

def load_results(folder: Path) -> list[dict[str, Any]]:
    """The result files of `folder` (not its subfolders); an unreadable one becomes a failed entry."""
    results = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "figures" not in data:
                raise ValueError("not a result file of benchmarks/common.py (no figures)")
        except (OSError, ValueError) as err:
            data = {"benchmark": path.stem, "status": "failed", "reason": f"unreadable {path.name}: {err}"}
        data.setdefault("benchmark", path.stem)
        results.append(data)
    return results


def benchmark_scripts(folder: Path = BENCH_DIR) -> list[str]:
    """The benchmarks of `folder`: its Python scripts but the helpers."""
    return sorted(p.stem for p in Path(folder).glob("*.py") if p.stem not in HELPERS and not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result files (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    results, gpu = load_results(args.results), load_results(args.results / "gpu")
    text = render(results, benchmark_scripts(), gpu)
    args.out.write_text(text)
    print(f"wrote {args.out}: {summary(results)}" + (f" GPU: {summary(gpu)}" if gpu else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
