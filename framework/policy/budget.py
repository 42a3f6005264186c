"""The budget a policy must meet, read from the `search` config: BitOps, model size, or both.

    B_bitops = search.budget_bitops                                   (absolute, at the resolution the
                                                                       layers were traced at)
             | b^2 * sum_{l searched} MACs_l + sum_{l fixed} MACs_l * f^2   (search.budget_uniform_bits = b,
                                                                       which may be fractional: 2.5)
    B_size   = search.budget_size_mb                                  (MB = 1e6 bytes, the size of
                                                                       framework.quant.cost.policy_cost)

`search.budget_bitops` wins over `search.budget_uniform_bits` when both are set; either BitOps
budget, the size budget, or both may be given. Fixed layers count at their fixed bits `f`
(`quant.fixed_bits`; none when the first and last layers are searched).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from framework.policy.schema import Budget
from framework.quant.cost import LayerCost


@dataclass(frozen=True)
class BudgetLimits:
    """Upper limits on a policy's cost: BitOps, size in MB (1e6 bytes); None: no limit of that kind."""

    bitops: float | None = None
    size_mb: float | None = None

    def __post_init__(self) -> None:
        if self.bitops is None and self.size_mb is None:
            raise ValueError("a budget limits BitOps, size or both")
        for value in (self.bitops, self.size_mb):
            if value is not None and not value > 0:
                raise ValueError(f"a budget is positive, not {value}")

    def as_budget(self, at: str = "target") -> Budget:
        """The policy file's `budget` field."""
        return Budget(bitops=self.bitops, size_mb=self.size_mb, at=at)

    def describe(self) -> str:
        parts = ([f"{self.bitops / 1e9:.4g} GBitOps"] if self.bitops is not None else []) + (
            [f"{self.size_mb:.4g} MB"] if self.size_mb is not None else [])
        return " and ".join(parts)


def uniform_budget_bitops(layers: list[LayerCost], bits: float, fixed: Collection[str], fixed_bits: int | None) -> float:
    """The BitOps of every searched layer at `bits` x `bits` per MAC (fixed layers at `fixed_bits`)."""
    return float(sum(
        layer.macs * (fixed_bits * fixed_bits if layer.name in fixed and fixed_bits else bits * bits) for layer in layers
    ))


def budget_from_config(scfg, layers: list[LayerCost], fixed: Collection[str], fixed_bits: int | None) -> BudgetLimits | None:
    """The limits `search.budget_bitops` / `search.budget_uniform_bits` and `search.budget_size_mb`
    set for `layers` (traced at the resolution the budget speaks of); None when no budget is set."""
    bitops = getattr(scfg, "budget_bitops", None)
    uniform = getattr(scfg, "budget_uniform_bits", None)
    size_mb = getattr(scfg, "budget_size_mb", None)
    if bitops:
        bitops = float(bitops)
    elif uniform:
        bitops = uniform_budget_bitops(layers, float(uniform), fixed, fixed_bits)
    else:
        bitops = None
    size_mb = float(size_mb) if size_mb else None
    if bitops is None and size_mb is None:
        return None
    return BudgetLimits(bitops=bitops, size_mb=size_mb)
