"""A study's report: `study.json` (every number, with the run folders it came from) and `study.md`
(the table, the comparisons with the baseline rows, and the plots).

Per row, over its seeds: top-1 mean, sample standard deviation (the seed spread), min and max;
BitOps and size; the search's wall time and images processed (forward passes x images, so a
two-pass step counts its batch twice) and that compute relative to the `study.reference` row (the
policy searched on the target itself); the fine-tuned model's largest Hessian eigenvalue and
surrogate gap.

A row is compared with a baseline row seed by seed (the two fine-tunes of one seed share their data
order): the mean of the paired differences of top-1 with its two-sided 95 % t interval
(framework.stats.paired_difference); the row is `better` or `worse` only when that interval
excludes 0, else `no difference`.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from framework.results import atomic_write_text, finished_result
from framework.stats import paired_difference
from framework.study.execute import DECISIVENESS
from framework.study.figures import plot_accuracy_vs_cost, plot_policies, plot_radius_traces

LANDSCAPE_KEYS = ("hessian_top_eigenvalue", "surrogate_gap")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _std(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise_row(row: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of one row over its finished runs."""
    top1 = [r["top1"] for r in runs]
    summary: dict[str, Any] = {
        "name": row["name"], "label": row.get("label") or row["name"], "source": _source(row),
        "seeds": [r["seed"] for r in runs], "runs": [r["dir"] for r in runs], "n": len(runs),
        "top1_by_seed": {str(r["seed"]): r["top1"] for r in runs},
        "top1_mean": _mean(top1), "top1_std": _std(top1),
        "val_top1_mean": _mean([r.get("val_top1") for r in runs]),  # the held-out split: what to select rows by
        "top1_min": min(top1) if top1 else None, "top1_max": max(top1) if top1 else None,
        "gbitops_mean": _mean([r["gbitops"] for r in runs]), "size_mb_mean": _mean([r["size_mb"] for r in runs]),
        "avg_w_bits_mean": _mean([r.get("avg_w_bits") for r in runs]),
        "avg_a_bits_mean": _mean([r.get("avg_a_bits") for r in runs]),
        "run_seconds_mean": _mean([r["seconds"] for r in runs]),
        # the kernel backends the row's fine-tunes ran (framework.quant.kernels): one, or the row mixes paths
        "kernels": sorted({f"{k['backend']} ({k['threads']} threads)" for r in runs if (k := r.get("kernels"))}),
    }
    searches = [r["search"] for r in runs if r.get("search")]
    if searches:
        summary.update(
            search_seconds_mean=_mean([s.get("seconds") for s in searches]),
            search_images_mean=_mean([s.get("images_processed") for s in searches]),
            proxy_top1_mean=_mean([s.get("proxy_top1") for s in searches]),
            final_rho_mean=_mean([s.get("rho") for s in searches]),
            entropy_mean=_mean([s.get("entropy") for s in searches]),
            argmax_bitops_ratio_mean=_mean([s.get("argmax_bitops_ratio") for s in searches]),
            fit_changed_layers_mean=_mean([s.get("fit_changed_layers") for s in searches]),
            undecided_runs=sum(1 for s in searches if s.get("undecided")),
        )
    for key in LANDSCAPE_KEYS:
        values = [r.get("landscape", {}).get(key) for r in runs]
        if any(v is not None for v in values):
            summary[f"{key}_mean"], summary[f"{key}_std"] = _mean(values), _std(values)
    return summary


def _source(row: dict[str, Any]) -> str:
    if row.get("policy"):
        spec = str(row["policy"])
        if spec.startswith("random+"):
            return f"random:<seed + {spec.split('+', 1)[1]}>"
        return {"random": "random:<seed>"}.get(spec, spec)
    return f"{row['search']} on {row.get('proxy') or 'the default proxy'}"


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Row `a` against row `b` over the seeds both finished: the paired difference of top-1 (`delta`,
    its mean), its 95 % interval (`low`, `high`), the per-seed `values`, `n` and the `verdict`."""
    a_seeds, b_seeds = a.get("top1_by_seed") or {}, b.get("top1_by_seed") or {}
    shared = sorted(set(a_seeds) & set(b_seeds), key=int)
    if not shared:
        return {"against": b["name"], "delta": None, "low": None, "high": None, "n": 0, "values": [],
                "verdict": "not measured"}
    paired = paired_difference([a_seeds[k] for k in shared], [b_seeds[k] for k in shared])
    return {"against": b["name"], "delta": paired["mean"], "low": paired["low"], "high": paired["high"],
            "n": paired["n"], "values": paired["values"], "seeds": [int(k) for k in shared], "verdict": paired["verdict"]}


def build_report(study: dict[str, Any], rows: list[dict[str, Any]], runs: list[dict[str, Any]],
                 fp: dict[str, Any] | None, out_dir: Path) -> dict[str, Any]:
    """study.json's content; also writes the figures into `out_dir`/figures."""
    for run in runs:  # runs recorded without the search's decisiveness: read it from the search's result.json
        search = run.get("search")
        if search and "entropy" not in search and (found := finished_result(out_dir / run["dir"] / "search")):
            search.update({k: found.get("metrics", {}).get(k) for k in DECISIVENESS})
    by_row = {row["name"]: [r for r in runs if r["row"] == row["name"]] for row in rows}
    summaries = [summarise_row(row, sorted(by_row[row["name"]], key=lambda r: r["seed"])) for row in rows]
    named = {s["name"]: s for s in summaries}
    reference = named.get(study.get("reference") or "")
    ref_images = (reference or {}).get("search_images_mean")
    ref_seconds = (reference or {}).get("search_seconds_mean")
    for s in summaries:
        if ref_images and s.get("search_images_mean") is not None:
            s["search_compute_rel"] = s["search_images_mean"] / ref_images
            s["search_seconds_rel"] = s["search_seconds_mean"] / ref_seconds if ref_seconds else None
        s["comparisons"] = [compare(s, named[b]) for b in study.get("baselines", []) if b in named and b != s["name"]]
    figures = {
        "accuracy_vs_cost": plot_accuracy_vs_cost(summaries, fp, out_dir / "figures" / "top1_vs_gbitops.png"),
        "policies": plot_policies(rows, by_row, out_dir / "figures" / "policies.png"),
    }
    traced = {name: [(r["seed"], r["search"]["rho_trace"]) for r in rs if r.get("search", {}).get("rho_trace")]
              for name, rs in by_row.items()}
    traced = {k: v for k, v in traced.items() if v}
    if traced:
        figures["radius"] = plot_radius_traces(traced, out_dir / "figures" / "radius.png")
    wall = sum(r["seconds"] for r in runs) + float((fp or {}).get("seconds") or 0.0)
    return {
        "schema": "mpq-study/1",
        "study": study,
        "full_precision": fp,
        "rows": summaries,
        "runs": sorted(runs, key=lambda r: (r["row"], r["seed"])),
        "figures": {k: str(Path(v).relative_to(out_dir)) for k, v in figures.items()},
        "wall_seconds": round(wall, 1),
        "machine": {"cpus": _cpus(), "platform": platform.platform(terse=True), "python": platform.python_version()},
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_markdown(report: dict[str, Any]) -> str:
    """study.md: what was run, the table, the comparisons and the plots."""
    study = report["study"]
    fp = report.get("full_precision") or {}
    lines = [
        f"# Study `{study['name']}`",
        "",
        f"Command: `mpq study study={study['name']}`. Seeds: {', '.join(map(str, study['seeds']))}. "
        f"Machine: {report['machine']['cpus']} CPU cores ({report['machine']['platform']}). "
        f"Compute time of all runs: {report['wall_seconds'] / 60:.1f} min (the stages' own times, summed).",
        "",
    ]
    if fp.get("top1") is not None:
        lines += [f"Full-precision start: top-1 {_pct(fp['top1'])} % ({fp.get('checkpoint')}).", ""]
    lines += [
        "Top-1 is the mean over seeds ± the sample standard deviation (the seed spread). Search compute is "
        "images processed (two passes count twice) relative to the "
        f"`{study.get('reference') or '–'}` row. λmax: largest Hessian eigenvalue of the fine-tuned model's "
        "training loss; gap: its surrogate gap L(w + ρ g/‖g‖) − L(w).",
        "",
        "| row | policy from | top-1 % | min–max | GBitOps | size MB | W/A bits | search s | images | compute | λmax | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["rows"]:
        bits = "–" if s.get("avg_w_bits_mean") is None else f"{s['avg_w_bits_mean']:.2f}/{s['avg_a_bits_mean']:.2f}"
        lines.append(
            f"| {s['label']} | {s['source']} | {_pct(s['top1_mean'])} ± {_pct(s['top1_std'])} | "
            f"{_pct(s['top1_min'])}–{_pct(s['top1_max'])} | {_num(s['gbitops_mean'])} | {_num(s['size_mb_mean'])} | {bits} | "
            f"{_num(s.get('search_seconds_mean'), '.0f')} | {_num(s.get('search_images_mean'), '.3g')} | "
            f"{_num(s.get('search_compute_rel'), '.2f')} | {_num(s.get('hessian_top_eigenvalue_mean'), '.3g')} | "
            f"{_num(s.get('surrogate_gap_mean'), '.3g')} |"
        )
    searched = [s for s in report["rows"] if s.get("entropy_mean") is not None]
    if searched:
        lines += ["", "## How decided the searches ended", "",
                  "Mean over seeds of the final bit distribution's normalised entropy (1: uniform; a search above "
                  "0.8 is undecided), the BitOps of its argmax policy over the budget, and how many layers the exact "
                  "fit to the budget changed from the argmax.", "",
                  "| row | entropy | argmax BitOps / budget | layers the fit changed | undecided runs |",
                  "|---|---|---|---|---|"]
        for s in searched:
            lines.append(f"| {s['label']} | {s['entropy_mean']:.3f} | {_num(s.get('argmax_bitops_ratio_mean'), '.2f')} | "
                         f"{_num(s.get('fit_changed_layers_mean'), '.1f')} | {s['undecided_runs']} of {s['n']} |")
    lines += ["", "## Against the baselines", "",
              "Paired by seed (the two fine-tunes of a seed share their data order): the mean difference of top-1 "
              "with its 95 % t interval; a row is better or worse only when the interval excludes 0.", ""]
    for s in report["rows"]:
        for c in s["comparisons"]:
            if c["delta"] is None:
                continue
            interval = (f"95 % interval [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]" if c.get("low") is not None
                        else "one seed, no interval")
            lines.append(f"- {s['label']} vs {c['against']}: {100 * c['delta']:+.2f} points over {c['n']} paired "
                         f"seeds, {interval}: **{c['verdict']}**")
    lines += ["", "## Plots", ""]
    for key, title in (("accuracy_vs_cost", "Top-1 against GBitOps"), ("policies", "Per-layer bits of each policy"),
                       ("radius", "ASGA's perturbation radius during the search")):
        if key in report["figures"]:
            lines += [f"### {title}", "", f"![{title}]({report['figures'][key]})", ""]
    lines += ["## Runs", "", "| row | seed | top-1 % | GBitOps | run folder |", "|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['row']} | {r['seed']} | {_pct(r['top1'])} | {_num(r['gbitops'])} | `{r['dir']}` |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """study.json and study.md in `out_dir`, atomically."""
    atomic_write_text(out_dir / "study.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "study.md", format_markdown(report))
    return {"study_json": str(out_dir / "study.json"), "study_md": str(out_dir / "study.md")}
