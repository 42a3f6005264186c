"""A study's plots: top-1 against GBitOps (one marker per row, mean ± seed spread), the per-layer
bits of every transferred policy, and ASGA's perturbation radius during the searches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.track.figures import pyplot, save_figure

MARKERS = "osD^v<>pPX*h"


def plot_accuracy_vs_cost(summaries: list[dict[str, Any]], fp: dict[str, Any] | None, path: Path) -> Path:
    """Mean top-1 (error bar: sample std over seeds) against mean GBitOps, one marker per row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(summaries):
        if s.get("top1_mean") is None:
            continue
        ax.errorbar(s["gbitops_mean"], 100 * s["top1_mean"], yerr=100 * (s["top1_std"] or 0.0), fmt=MARKERS[i % len(MARKERS)],
                    capsize=3, markersize=7, label=f"{s['label']} (n={s['n']})")
    if fp and fp.get("top1") is not None:
        ax.axhline(100 * fp["top1"], color="grey", linestyle=":", label="full precision")
    ax.set_xlabel("GBitOps (target resolution)")
    ax.set_ylabel("top-1 on the target's test split (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_policies(rows: list[dict[str, Any]], by_row: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per row: weight bits (solid) and activation bits (dashed) per layer, one colour per seed."""
    plt = pyplot()
    named = [row for row in rows if by_row.get(row["name"])]
    cols = min(3, max(1, len(named)))
    nrows = max(1, -(-len(named) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.6 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(named):]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, named, strict=False):
        for k, run in enumerate(sorted(by_row[row["name"]], key=lambda r: r["seed"])):
            layers = list(run["policy"])
            x = range(len(layers))
            colour = f"C{k}"
            ax.plot(x, [run["policy"][n][0] for n in layers], color=colour, marker="o", markersize=3, label=f"seed {run['seed']} W")
            ax.plot(x, [run["policy"][n][1] for n in layers], color=colour, linestyle="--", marker="x", markersize=3,
                    label=f"seed {run['seed']} A")
        ax.set_title(row.get("label") or row["name"], fontsize=9)
        ax.set_xlabel("layer (network order)", fontsize=8)
        ax.set_ylabel("bits", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_radius_traces(traced: dict[str, list[tuple[int, list]]], path: Path) -> Path:
    """The two-pass rule's radius rho at every step of each searched run, one colour per row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, seeds) in enumerate(traced.items()):
        for j, (_seed, trace) in enumerate(seeds):
            steps, rho = zip(*trace, strict=True)
            ax.plot(steps, rho, color=f"C{i}", alpha=0.8, linewidth=1, label=name if j == 0 else None)
    ax.set_xlabel("search step")
    ax.set_ylabel("perturbation radius rho")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
