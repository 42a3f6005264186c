"""The policy file (`policy.json`, schema `mpq-policy/1`): what a search hands to fine-tuning.

A policy names its model and gives, per layer (module name), `w_bits`, `a_bits`, `macs`, `params`
and whether the layer was fixed; the cost (MACs, BitOps, size) at the proxy and the target
resolution; an optional budget (`budget: {"bitops": B, "size_mb": S, "at": "target"|"proxy"}`, either
limit or both); whether the policy was fitted to the budget (`repair`: the method and the solver's
record); and provenance (method and hyperparameters, proxy data, fraction, seed, hash of the sample
indices, code version).

Reading validates the structure (pydantic) and :func:`validate_policy` checks it against a model:
unknown or missing layers, unsupported bit-widths, a policy of another model and a broken budget
are each one :class:`MPQError` naming the layer or field and what would fix it. :func:`make_policy`
assembles per-layer bits (:mod:`framework.policy.bits`) into a :class:`Policy`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from framework import __version__
from framework.errors import MPQError
from framework.quant.cost import LayerCost, policy_cost
from framework.quant.quantizers import SUPPORTED_BITS
from framework.results import atomic_write_text

SCHEMA = "mpq-policy/1"


class LayerPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    w_bits: int
    a_bits: int
    macs: float = Field(ge=0)
    params: int = Field(ge=0)
    fixed: bool = False


class CostAt(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_size: int
    in_channels: int
    macs: float
    bitops: float
    gbitops: float
    size_mb: float


class Budget(BaseModel):
    """Upper limits on the policy's cost: BitOps at the `at` resolution, size in MB; at least one."""

    model_config = ConfigDict(extra="forbid")

    bitops: float | None = Field(default=None, gt=0)
    size_mb: float | None = Field(default=None, gt=0)
    at: Literal["proxy", "target"] = "target"

    @model_validator(mode="after")
    def _one_limit(self) -> Budget:
        if self.bitops is None and self.size_mb is None:
            raise ValueError("a budget gives bitops, size_mb or both")
        return self


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["mpq-policy/1"] = Field(alias="schema")
    model: str
    layers: dict[str, LayerPolicy]
    cost: dict[str, CostAt] = Field(default_factory=dict)
    budget: Budget | None = None
    repair: dict[str, Any] = Field(default_factory=lambda: {"applied": False})
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _not_empty(cls, layers: dict[str, LayerPolicy]) -> dict[str, LayerPolicy]:
        if not layers:
            raise ValueError("a policy needs at least one layer")
        return layers

    def bits(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.w_bits, layer.a_bits) for name, layer in self.layers.items()}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2) + "\n"

    def average_bits(self) -> dict[str, float]:
        """MAC-weighted mean weight and activation bits over the searched (non-fixed) layers."""
        searched = [layer for layer in self.layers.values() if not layer.fixed] or list(self.layers.values())
        macs = sum(layer.macs for layer in searched) or 1.0
        return {
            "w_bits": sum(layer.w_bits * layer.macs for layer in searched) / macs,
            "a_bits": sum(layer.a_bits * layer.macs for layer in searched) / macs,
        }


# --------------------------------------------------------------------------- reading and writing


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"field '{where}': {first['msg']}"


def policy_from_dict(data: Any, source: str = "policy") -> Policy:
    if not isinstance(data, dict):
        raise MPQError(f"{source} is not a JSON object; a policy file has schema, model and layers")
    if data.get("schema") != SCHEMA:
        raise MPQError(f"{source} has schema {data.get('schema')!r}; expected '{SCHEMA}'")
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        raise MPQError(f"{source} is malformed: {_describe(err)}") from None


def read_policy(path: str | Path) -> Policy:
    """Read and structurally validate a policy file."""
    path = Path(path)
    if not path.is_file():
        raise MPQError(f"policy file {path} does not exist; pass policy=<path to policy.json>, uniform:W/A, random:<seed> or uniform-budget")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MPQError(f"policy file {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise MPQError(f"policy file {path} is not UTF-8 text; a policy file is JSON") from None
    return policy_from_dict(data, f"policy file {path}")


def write_policy(policy: Policy, path: str | Path, plot: bool = True) -> dict[str, str]:
    """Write `policy.json` atomically, and its bar chart (PNG) beside it; returns the paths."""
    path = Path(path)
    atomic_write_text(path, policy.to_json())
    written = {"policy": str(path)}
    if plot:
        from framework.track.figures import plot_policy

        written["policy_plot"] = str(plot_policy(policy, path.with_suffix(".png")))
    return written


# --------------------------------------------------------------------------- validation


def validate_policy(
    policy: Policy,
    model_name: str,
    layers: list[LayerCost],
    source: str = "policy",
    recompute: Callable[[int, int], CostAt] | None = None,
) -> None:
    """Check a policy against the model it is applied to; every problem names the layer or field.

    `recompute(input_size, in_channels)` gives the policy's cost on the real model at a resolution;
    with it the budget is checked against measured BitOps, not the numbers written in the file.
    """
    if policy.model != model_name:
        raise MPQError(f"{source} is for model '{policy.model}', not '{model_name}'; search a policy for {model_name} or pick model={policy.model}")
    known = {layer.name for layer in layers}
    unknown = [name for name in policy.layers if name not in known]
    if unknown:
        raise MPQError(f"{source} names unknown layer '{unknown[0]}' (model {model_name} has e.g. {sorted(known)[:3]}); remove it or fix its name")
    missing = [layer.name for layer in layers if layer.name not in policy.layers]
    if missing:
        raise MPQError(f"{source} is missing layer '{missing[0]}' of model {model_name}; give every conv and linear layer w_bits and a_bits")
    for name, layer in policy.layers.items():
        for field in ("w_bits", "a_bits"):
            value = getattr(layer, field)
            if value not in SUPPORTED_BITS:
                raise MPQError(f"{source}: layer '{name}' has {field}={value}, which is not supported; use one of {list(SUPPORTED_BITS)}")
    if policy.budget is not None:
        at = policy.cost.get(policy.budget.at)
        if at is None:
            raise MPQError(f"{source} states a budget at the {policy.budget.at} resolution but has no cost.{policy.budget.at}")
        measured = recompute(at.input_size, at.in_channels) if recompute is not None else at
        check_budget(policy.budget, measured, source)


def check_budget(budget: Budget, cost: CostAt, source: str = "policy") -> None:
    """Each limit the budget gives holds for `cost` (to a relative 1e-9), else one :class:`MPQError`."""
    if budget.bitops is not None and cost.bitops > budget.bitops * (1 + 1e-9):
        raise MPQError(
            f"{source} breaks its budget: {cost.bitops / 1e9:.4f} GBitOps at the {budget.at} resolution > "
            f"budget {budget.bitops / 1e9:.4f} GBitOps; lower some layers' bits or raise budget.bitops"
        )
    if budget.size_mb is not None and cost.size_mb > budget.size_mb * (1 + 1e-9):
        raise MPQError(
            f"{source} breaks its budget: {cost.size_mb:.4f} MB > budget {budget.size_mb:.4f} MB; "
            f"lower some layers' weight bits or raise budget.size_mb"
        )


# --------------------------------------------------------------------------- building policies


def cost_at(layers: list[LayerCost], bits: Mapping[str, tuple[int, int]], total_params: int, input_size: int, in_channels: int) -> CostAt:
    return CostAt(input_size=int(input_size), in_channels=int(in_channels), **policy_cost(layers, bits, total_params))


def make_policy(
    model_name: str,
    layers: list[LayerCost],
    bits: Mapping[str, tuple[int, int]],
    fixed: set[str],
    costs: Mapping[str, CostAt],
    budget: Budget | None = None,
    repair: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Policy:
    """Assemble a :class:`Policy` (bits per layer, MACs and params from `layers` as traced)."""
    return Policy(
        schema=SCHEMA,
        model=model_name,
        layers={
            layer.name: LayerPolicy(
                w_bits=int(bits[layer.name][0]), a_bits=int(bits[layer.name][1]), macs=layer.macs,
                params=layer.params, fixed=layer.name in fixed,
            )
            for layer in layers
        },
        cost=dict(costs),
        budget=budget,
        repair=repair or {"applied": False},
        provenance={"code_version": __version__, **(provenance or {})},
    )
