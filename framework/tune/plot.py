"""The Pareto plot of a sweep: proxy top-1 against the BitOps of each trial's policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_pareto(
    trials: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    path: str | Path,
    budget_bitops: float | None = None,
    selected: Mapping[str, Any] | None = None,
    title: str = "sweep",
) -> Path:
    """Finished trials as points (GBitOps, proxy top-1 %), the Pareto front as a step line, the
    budget as a dashed line and the selected policy as a star; trials stopped early appear hollow
    at their last reported accuracy and expected BitOps. Each point is labelled with its trial index.
    """
    from framework.track.figures import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    finished = [t for t in trials if t.get("status") == "finished"]
    stopped = [t for t in trials if t.get("status") == "stopped" and t.get("proxy_top1") is not None
               and t.get("expected_bitops")]
    if stopped:
        ax.scatter([t["expected_bitops"] / 1e9 for t in stopped], [100 * t["proxy_top1"] for t in stopped],
                   facecolors="none", edgecolors="#888888", label="stopped early (last report)", zorder=2)
    ax.scatter([t["bitops"] / 1e9 for t in finished], [100 * t["proxy_top1"] for t in finished],
               color="#3b6ea5", label="finished trials", zorder=3)
    for t in [*finished, *stopped]:
        x = (t["bitops"] if t.get("status") == "finished" else t["expected_bitops"]) / 1e9
        ax.annotate(str(t.get("index", "")), (x, 100 * t["proxy_top1"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7, color="#444444")
    if front:
        ax.step([t["bitops"] / 1e9 for t in front], [100 * t["proxy_top1"] for t in front], where="post",
                color="#e0913a", label="Pareto front", zorder=4)
    if budget_bitops:
        ax.axvline(budget_bitops / 1e9, color="#b03030", linestyle="--", linewidth=1, label="budget")
    if selected is not None:
        ax.scatter([selected["bitops"] / 1e9], [100 * selected["proxy_top1"]], marker="*", s=220, color="#b03030",
                   edgecolors="black", linewidths=0.6, label="selected", zorder=5)
    ax.set_xlabel("GBitOps (target resolution)")
    ax.set_ylabel("proxy top-1 (%)")
    ax.set_title(f"{title}: {len(finished)} finished, {len(stopped)} stopped early", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)
