"""Figures people would rather look at than read: the per-layer bits of a policy, the bit-width
probabilities of a search, a 1-D slice of the loss landscape."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from framework.policy import Policy


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), its logger quiet."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig: object) -> Path:
    """Write `fig` to `path` (folders made as needed), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    pyplot().close(fig)
    return path


def plot_policy(policy: Policy, path: str | Path) -> Path:
    """A bar chart of weight and activation bits per layer (execution order); fixed layers hatched."""
    plt = pyplot()

    names = list(policy.layers)
    w = [policy.layers[n].w_bits for n in names]
    a = [policy.layers[n].a_bits for n in names]
    x = range(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6), dpi=110)
    bars_w = ax.bar([i - width / 2 for i in x], w, width, label="weights", color="#3b6ea5")
    bars_a = ax.bar([i + width / 2 for i in x], a, width, label="activations", color="#e0913a")
    for i, name in enumerate(names):
        if policy.layers[name].fixed:
            bars_w[i].set_hatch("//")
            bars_a[i].set_hatch("//")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("bits")
    shown = sorted({*w, *a})
    ax.set_yticks(shown)
    ax.set_ylim(0, max(shown) * 1.15)
    cost = policy.cost.get("target") or next(iter(policy.cost.values()), None)
    title = f"{policy.model} policy"
    if cost is not None:
        title += f"  ({cost.gbitops:.3f} GBitOps, {cost.size_mb:.3f} MB at {cost.input_size}px)"
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color="#3b6ea5", label="weights"), Patch(color="#e0913a", label="activations")]
    if any(layer.fixed for layer in policy.layers.values()):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="fixed layer"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bit_probabilities(
    probs: dict[str, dict[str, list[float]]], candidates: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], path: str | Path
) -> Path:
    """Heat-maps of the searched layers' bit-width probabilities (softmax of the logits)."""
    plt = pyplot()
    import numpy as np

    names = list(probs)
    fig, axes = plt.subplots(1, 2, figsize=(8, max(3.0, 0.25 * len(names) + 1.2)), dpi=110, sharey=True)
    for ax, side, title in ((axes[0], "w", "weights"), (axes[1], "a", "activations")):
        grid = np.array([probs[n][side] for n in names])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        bits = candidates[names[0]][0 if side == "w" else 1]
        ax.set_xticks(range(len(bits)))
        ax.set_xticklabels([str(b) for b in bits])
        ax.set_xlabel("bits")
        ax.set_title(f"P(bits) {title}", fontsize=9)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(names, fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, path, bbox_inches="tight")


def plot_loss_curve(t: list[float], loss: list[float], path: str | Path, title: str = "loss along a random direction") -> Path:
    """The 1-D loss curve `L(w + t d)` against `t`, the trained weights (`t = 0`) marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=110)
    ax.plot(t, loss, marker="o", markersize=3, color="#3b6ea5")
    ax.axvline(0.0, color="#e0913a", linestyle="--", linewidth=1, label="trained weights (t = 0)")
    ax.set_xlabel("t (filter-normalised direction d)")
    ax.set_ylabel("L(w + t d)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
