"""How decisive were the searches of a study, and what decided their policies?

For every searched run of a study folder (`outputs/study/<name>`), from its `search/policy.json`:
the mean over searched layers (weights and activations) of the largest bit probability and of the
normalised entropy H(p)/ln(K) of the final bit distribution (1: uniform, the logits never moved;
0: one-hot), the BitOps of the argmax policy against the budget (below it: the complexity penalty
pushed every layer down and the exact fit chose which layers to raise), and ASGA's radius at the
start and end of the search. Prints one Markdown table per row (means over its seeds); reads only.

    .venv/bin/python benchmarks/search_decisiveness.py outputs/study/fmnist_resnet8
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from statistics import mean


def _search_numbers(search_dir: Path) -> dict[str, float] | None:
    try:
        policy = json.loads((search_dir / "policy.json").read_text())
        result = json.loads((search_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    probs = policy["provenance"]["probabilities"]
    dists = [dist[side] for dist in probs.values() for side in ("w", "a")]
    entropy = [-sum(p * math.log(p) for p in d if p > 0) / math.log(len(d)) for d in dists]
    trace = result.get("rho_trace") or []
    fit = policy.get("repair", {})
    return {
        "max_p": mean(max(d) for d in dists),
        "entropy": mean(entropy),
        "argmax_over_budget": fit.get("bitops_before", float("nan")) / fit.get("budget_bitops", float("nan")),
        "fitted_over_budget": fit.get("bitops", float("nan")) / fit.get("budget_bitops", float("nan")),
        "changed": float(bool(fit.get("applied"))),
        "rho_first": trace[0][1] if trace else float("nan"),
        "rho_last": trace[-1][1] if trace else float("nan"),
    }


def main(folder: str) -> None:
    runs = Path(folder) / "runs"
    print("| row | seeds | mean max p | mean entropy H/ln K | argmax BitOps / budget | fitted / budget | fit changed | rho first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(p for p in runs.iterdir() if p.is_dir()):
        numbers = [n for n in (_search_numbers(seed / "search") for seed in sorted(row.glob("seed*"))) if n]
        if not numbers:
            continue
        m = {k: mean(n[k] for n in numbers) for k in numbers[0]}
        print(f"| {row.name} | {len(numbers)} | {m['max_p']:.3f} | {m['entropy']:.3f} | {m['argmax_over_budget']:.2f} | "
              f"{m['fitted_over_budget']:.3f} | {m['changed']:.0%} | {m['rho_first']:.3f} -> {m['rho_last']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/study/fmnist_resnet8")
