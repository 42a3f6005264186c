"""The policy file (`policy.json`, schema `mpq-policy/1`): what a search hands to fine-tuning.

A policy names its model and gives, per layer (module name), `w_bits`, `a_bits`, `macs`, `params`
and whether the layer was fixed; the cost (MACs, BitOps, size) at the proxy and the target
resolution; an optional BitOps budget (`budget: {"bitops": B, "at": "target"|"proxy"}`); whether a
budget repair was applied; and provenance (method and hyperparameters, proxy data, fraction, seed,
hash of the sample indices, code version).

Reading validates the structure (pydantic) and :func:`validate_policy` checks it against a model:
unknown or missing layers, unsupported bit-widths, a policy of another model and a broken budget
are each one :class:`MPQError` naming the layer or field and what would fix it.

Policies come from a search (:func:`derive_bits`, argmax of the logits per layer, with an optional
budget :func:`repair`), or from the baselines: :func:`uniform_bits` and :func:`random_bits` (seeded,
under a budget); :func:`make_policy` assembles the bits into a :class:`Policy`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from framework import __version__
from framework.errors import MPQError
from framework.quant.cost import LayerCost, policy_cost
from framework.quant.layers import SEARCH_LAYERS
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
    model_config = ConfigDict(extra="forbid")

    bitops: float = Field(gt=0)
    at: Literal["proxy", "target"] = "target"


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
        raise MPQError(f"policy file {path} does not exist; pass policy=<path to policy.json> or policy=uniform:W/A")
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
        check_budget(policy.budget, measured.bitops, source)


def check_budget(budget: Budget, bitops: float, source: str = "policy") -> None:
    if bitops > budget.bitops * (1 + 1e-9):
        raise MPQError(
            f"{source} breaks its budget: {bitops / 1e9:.4f} GBitOps at the {budget.at} resolution > "
            f"budget {budget.bitops / 1e9:.4f} GBitOps; lower some layers' bits or raise budget.bitops"
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


def parse_uniform(spec: str) -> tuple[int, int] | None:
    """`uniform:W/A` -> (W, A); anything else -> None."""
    if not str(spec).startswith("uniform:"):
        return None
    body = str(spec).split(":", 1)[1]
    try:
        w, a = (int(part) for part in body.split("/"))
    except ValueError:
        raise MPQError(f"policy={spec} is malformed; write uniform:W/A with whole numbers, e.g. uniform:4/4") from None
    for value in (w, a):
        if value not in SUPPORTED_BITS:
            raise MPQError(f"policy={spec}: {value} bits is not supported; use one of {list(SUPPORTED_BITS)}")
    return w, a


def uniform_bits(layers: list[LayerCost], w_bits: int, a_bits: int, fixed: set[str], fixed_bits: int | None) -> dict[str, tuple[int, int]]:
    """Every layer at W/A, the fixed layers at `fixed_bits`."""
    return {
        layer.name: ((fixed_bits, fixed_bits) if layer.name in fixed and fixed_bits else (w_bits, a_bits))
        for layer in layers
    }


def _bitops(layers: list[LayerCost], bits: Mapping[str, tuple[int, int]]) -> float:
    return float(sum(layer.macs * bits[layer.name][0] * bits[layer.name][1] for layer in layers))


def random_bits(
    layers: list[LayerCost], candidates_w: list[int], candidates_a: list[int], fixed: set[str], fixed_bits: int | None,
    budget_bitops: float | None, seed: int,
) -> dict[str, tuple[int, int]]:
    """A seeded random policy: bits drawn uniformly from the candidates, then lowered at random
    (one candidate step of one layer at a time) until the BitOps budget holds."""
    rng = np.random.default_rng(int(seed))
    cw, ca = sorted(candidates_w), sorted(candidates_a)
    bits: dict[str, tuple[int, int]] = {}
    for layer in layers:
        if layer.name in fixed and fixed_bits:
            bits[layer.name] = (fixed_bits, fixed_bits)
        else:
            bits[layer.name] = (int(rng.choice(cw)), int(rng.choice(ca)))
    if budget_bitops is None:
        return bits
    floor = {**bits, **{layer.name: (cw[0], ca[0]) for layer in layers if layer.name not in fixed or not fixed_bits}}
    if _bitops(layers, floor) > budget_bitops:
        raise MPQError(
            f"budget {budget_bitops / 1e9:.4f} GBitOps is impossible: even the lowest candidates "
            f"({cw[0]}/{ca[0]} bits) cost {_bitops(layers, floor) / 1e9:.4f} GBitOps; raise the budget"
        )
    while _bitops(layers, bits) > budget_bitops:
        moves = [
            (name, side)
            for name, (w, a) in bits.items()
            if not (name in fixed and fixed_bits)
            for side, value, cands in ((0, w, cw), (1, a, ca))
            if cands.index(value) > 0
        ]
        name, side = moves[int(rng.integers(len(moves)))]
        w, a = bits[name]
        if side == 0:
            w = cw[cw.index(w) - 1]
        else:
            a = ca[ca.index(a) - 1]
        bits[name] = (w, a)
    return bits


def derive_bits(model) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, list[float]]]]:
    """Per searchable layer, the argmax of the logits (EdMIPS/GMPQ); also the probabilities."""
    bits, probs = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, SEARCH_LAYERS):
            pw, pa = (p.detach().cpu() for p in module.bit_probabilities())
            bits[name] = (module.w_candidates[int(pw.argmax())], module.a_candidates[int(pa.argmax())])
            probs[name] = {"w": pw.tolist(), "a": pa.tolist()}
        elif hasattr(module, "w_bits") and hasattr(module, "a_bits"):
            bits[name] = (module.w_bits, module.a_bits)
        elif hasattr(module, "mpq_fixed_bits"):  # a fixed layer kept in full precision
            bits[name] = tuple(module.mpq_fixed_bits)
    return bits, probs


def repair(
    layers: list[LayerCost], bits: dict[str, tuple[int, int]], probs: dict[str, dict[str, list[float]]],
    candidates: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], budget_bitops: float,
    joint: set[str] | frozenset[str] = frozenset(),
) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """Lower bits until `BitOps <= budget`: at each step, the one-candidate drop (weights or
    activations of one searched layer; both at once for layers in `joint`) that loses the least
    probability mass `p(current) - p(lower)`; ties go to the larger BitOps saving. Candidate
    sets are in ascending order (as the searchable layers keep them)."""
    bits = dict(bits)
    macs = {layer.name: layer.macs for layer in layers}
    before = _bitops(layers, bits)
    steps = []
    while _bitops(layers, bits) > budget_bitops:
        best = None
        for name, (cw, ca) in candidates.items():
            w, a = bits[name]
            for side, value, cands, p in ((0, w, cw, probs[name]["w"]), (1, a, ca, probs[name]["a"])):
                i = cands.index(value)
                if i == 0:
                    continue
                loss = p[i] - p[i - 1]
                lower = cands[i - 1]
                if name in joint:
                    if side == 1:
                        continue
                    saving = macs[name] * (value * value - lower * lower)
                    side = 2
                else:
                    saving = macs[name] * ((value - lower) * (a if side == 0 else w))
                key = (loss, -saving)
                if best is None or key < best[0]:
                    best = (key, name, side, lower)
        if best is None:
            raise MPQError(
                f"budget {budget_bitops / 1e9:.4f} GBitOps is impossible: every searched layer is at its "
                f"lowest candidate and the policy still costs {_bitops(layers, bits) / 1e9:.4f} GBitOps; raise the budget"
            )
        _, name, side, lower = best
        w, a = bits[name]
        bits[name] = {0: (lower, a), 1: (w, lower), 2: (lower, lower)}[side]
        steps.append({"layer": name, "side": {0: "w", 1: "a", 2: "wa"}[side], "to": lower})
    return bits, {
        "applied": bool(steps), "steps": steps, "bitops_before": before, "bitops_after": _bitops(layers, bits),
        "budget_bitops": budget_bitops,
    }


