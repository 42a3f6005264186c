"""From a policy specification to a quantized, calibrated model: what the stages share.

`policy=` is one of

- `uniform:W/A`: every layer at W/A bits, the first conv and last linear at `quant.fixed_bits`;
- `random:<seed>`: per searched layer a pair drawn from `search.quant.candidates_w/_a` (numpy's
  `default_rng(seed)`), fitted to the search's budget (`search.budget_*`) exactly: the
  budget-meeting policy closest to the draw (framework.policy.random_bits); without a budget, the draw;
- `uniform-budget`: the uniform W/A of those candidates with the most BitOps within the budget;
- `hawq`: per searched layer the pair (w, a) of those candidates ranked by HAWQ's trace-weighted
  quantization error `Omega_l(w, a)` (Dong et al., HAWQ-V2; Yao et al., HAWQ-V3), measured on the
  full-precision model; the policy minimising `sum_l Omega_l` within the budget (the exact knapsack,
  framework.policy.fit_scores_to_budget, with the fill bound `search.budget_fill`);
- `sensitivity`: the same with ZeroQ's single-layer loss increases (Cai et al., ZeroQ) as `Omega_l`;
- `random-best:<K>`: best-of-K random search, the selection made on held-out data: the K budget-fitted
  policies `random:<K s + i>` (i < K, s the run's `seed`), each applied to the full-precision model
  (LSQ steps initialised on the first held-out batch, no training), and the one of least mean
  cross-entropy on the held-out batches kept. Fine-tuning then starts from it like any policy, so the
  fine-tune's seed never took part in the choice (the study's random-search baseline);
- the path of a `policy.json`, which is validated against the model.

`hawq`, `sensitivity` and `random-best:<K>` (framework.landscape.sensitivity states the first two) need the trained
full-precision model and held-out batches (the validation split, else training batches): a :class:`Reference`, which the stages that load a
full-precision checkpoint pass. The baselines record their method, seed or measurements and fit in
`provenance` and the budget in `budget`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from framework.errors import MPQError
from framework.landscape.batches import CrossEntropyOnBatches
from framework.landscape.params import loss_value
from framework.landscape.sensitivity import hawq_sensitivity, loss_sensitivity
from framework.policy import (
    DEFAULT_FILL,
    CostAt,
    Policy,
    budget_from_config,
    cost_at,
    fit_scores_to_budget,
    make_policy,
    parse_random,
    parse_uniform,
    random_bits,
    read_policy,
    uniform_bits,
    uniform_budget_bits,
    validate_policy,
)
from framework.quant.convert import fixed_bits_of, fixed_layer_names, quantize_model
from framework.quant.cost import LayerCost, float_parameter_count, trace_layers
from framework.train.loop import preserved_rng


@dataclass
class Geometry:
    """The input a cost is measured at: `input_size` pixels square, `in_channels` channels."""

    input_size: int
    in_channels: int


@dataclass
class Reference:
    """What `policy=hawq` and `policy=sensitivity` are measured on: the full-precision `model` with its
    trained weights, `batches()` (held-out or training batches, loaded when first needed) and the `device`; HAWQ's
    `probes` Rademacher probes drawn from `seed`, `hold_graphs` as framework.landscape.trace says."""

    model: nn.Module
    batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
    device: torch.device
    probes: int = 12
    seed: int = 0
    hold_graphs: bool = True


#: `policy=uniform-budget`
UNIFORM_BUDGET = "uniform-budget"
#: `policy=hawq`, `policy=sensitivity`: derived from measurements of the full-precision model
HAWQ, SENSITIVITY = "hawq", "sensitivity"
#: `policy=random-best:<K>`
RANDOM_BEST = "random-best"


def parse_random_best(spec: str) -> int | None:
    """`random-best:<K>` -> K (a whole number >= 1); anything else -> None."""
    if not str(spec).startswith(RANDOM_BEST + ":"):
        return None
    body = str(spec).split(":", 1)[1]
    if not body.isdigit() or int(body) < 1:
        raise MPQError(f"policy={spec} is malformed; write random-best:<K> with K >= 1 policies to choose from, e.g. random-best:8")
    return int(body)


def resolve_policy(
    spec: str, model_name: str, build_float: Callable[[], nn.Module], geometry: Geometry, qcfg, *, search_cfg=None,
    reference: Reference | None = None,
) -> tuple[Policy, list[LayerCost]]:
    """The :class:`Policy` named by `spec` for the float model `build_float()` at `geometry`.

    `qcfg` (`quant`) gives the fixed layers; `search_cfg` (`search`) the candidates and the budget
    of `random:<seed>`, `uniform-budget`, `hawq` and `sensitivity` (measured at `geometry`), which
    need it; `reference` the full-precision model and batches `hawq` and `sensitivity` measure
    (without it they are one :class:`MPQError`). Returns the policy (its `cost.target` measured at
    `geometry`) and the traced layers.
    """
    model = build_float()
    layers = trace_layers(model, geometry.input_size, geometry.in_channels)
    total_params = float_parameter_count(model)

    def recompute_with(bits):
        def recompute(input_size: int, in_channels: int) -> CostAt:
            at = layers if (input_size, in_channels) == (geometry.input_size, geometry.in_channels) else trace_layers(
                build_float(), input_size, in_channels
            )
            return cost_at(at, bits, total_params, input_size, in_channels)

        return recompute

    uniform = parse_uniform(spec)
    if uniform is not None:
        fixed = fixed_layer_names(layers, fixed_bits_of(qcfg))
        bits = uniform_bits(layers, uniform[0], uniform[1], fixed, fixed_bits_of(qcfg))
        target = cost_at(layers, bits, total_params, geometry.input_size, geometry.in_channels)
        policy = make_policy(
            model_name, layers, bits, fixed, {"target": target},
            provenance={"method": "uniform", "w_bits": uniform[0], "a_bits": uniform[1]},
        )
        return policy, layers

    if spec == UNIFORM_BUDGET or parse_random(spec) is not None:
        return _baseline(spec, model_name, layers, total_params, geometry, qcfg, search_cfg), layers

    # measured policies leave the random streams as they found them: the fine-tune that follows draws
    # what it would under any other policy at the same seed (a study's rows stay paired)
    if parse_random_best(spec) is not None:
        with preserved_rng():
            return _best_random(spec, model_name, layers, total_params, geometry, qcfg, search_cfg, reference), layers

    if spec in (HAWQ, SENSITIVITY):
        with preserved_rng():
            return _derived(spec, model_name, layers, total_params, geometry, qcfg, search_cfg, reference), layers

    policy = read_policy(spec)
    source = f"policy file {spec}"
    validate_policy(policy, model_name, layers, source, recompute=recompute_with(policy.bits()))
    # report the cost at the requested geometry, measured on the model (not copied from the file)
    policy.cost["target"] = cost_at(layers, policy.bits(), total_params, geometry.input_size, geometry.in_channels)
    return policy, layers


def _search_space(spec: str, layers: list[LayerCost], qcfg, search_cfg):
    """(fixed bits, fixed layer names, weight candidates, activation candidates, budget limits or None)
    of the search config, which every baseline spec is resolved under."""
    if search_cfg is None:
        raise ValueError(f"policy={spec} needs the search config (its candidates and budget): pass search_cfg")
    fixed_bits = fixed_bits_of(qcfg)
    fixed = fixed_layer_names(layers, fixed_bits)
    cw, ca = sorted(int(b) for b in search_cfg.quant.candidates_w), sorted(int(b) for b in search_cfg.quant.candidates_a)
    return fixed_bits, fixed, cw, ca, budget_from_config(search_cfg, layers, fixed, fixed_bits)


def _baseline(spec: str, model_name: str, layers: list[LayerCost], total_params: int, geometry: Geometry, qcfg,
              search_cfg) -> Policy:
    """`random:<seed>` or `uniform-budget` under the search's candidates and budget."""
    fixed_bits, fixed, cw, ca, limits = _search_space(spec, layers, qcfg, search_cfg)
    provenance = {"method": "random" if spec != UNIFORM_BUDGET else UNIFORM_BUDGET, "candidates_w": cw, "candidates_a": ca}
    if spec == UNIFORM_BUDGET:
        if limits is None:
            raise MPQError("policy=uniform-budget needs search.budget_uniform_bits, search.budget_bitops or search.budget_size_mb")
        bits, record = uniform_budget_bits(layers, cw, ca, fixed, fixed_bits, limits, total_params)
        provenance.update(w_bits=record["w_bits"], a_bits=record["a_bits"], fit=record)
    else:
        seed = parse_random(spec)
        fill = float(getattr(search_cfg, "budget_fill", DEFAULT_FILL))
        bits, record = random_bits(layers, cw, ca, fixed, fixed_bits, seed, limits, total_params, fill)
        provenance.update(seed=seed, fit=record)
    target = cost_at(layers, bits, total_params, geometry.input_size, geometry.in_channels)
    return make_policy(model_name, layers, bits, fixed, {"target": target},
                       budget=limits.as_budget() if limits is not None else None, provenance=provenance)


def _needs_reference(spec: str, reference: Reference | None) -> Reference:
    if reference is None:
        raise MPQError(
            f"policy={spec} is measured on a full-precision checkpoint and its data, which this stage does not "
            f"load; derive it where one is given (mpq evaluate checkpoint=<pretrained checkpoint>, mpq finetune "
            f"init_checkpoint=<pretrained checkpoint>) and pass the policy.json that run writes"
        )
    return reference


def _best_random(spec: str, model_name: str, layers: list[LayerCost], total_params: int, geometry: Geometry, qcfg,
                 search_cfg, reference: Reference | None) -> Policy:
    """`random-best:<K>`: of the K budget-fitted draws `random:<K seed + i>`, the one whose quantized
    full-precision model has the least held-out loss (no training)."""
    reference = _needs_reference(spec, reference)
    count = parse_random_best(spec)
    started = time.time()
    batches = reference.batches()
    loss = CrossEntropyOnBatches(batches)
    tried = []
    for i in range(count):
        seed = count * reference.seed + i
        drawn = _baseline(f"random:{seed}", model_name, layers, total_params, geometry, qcfg, search_cfg)
        model = quantize_with_policy(copy.deepcopy(reference.model).cpu(), drawn, qcfg, layers).to(reference.device)
        with torch.no_grad():  # data-dependent quantizers (LSQ activation steps) from the first held-out batch
            model.eval()
            model(batches[0][0])
        tried.append((loss_value(model, loss), seed, drawn))
        del model
    best_loss, best_seed, best = min(tried, key=lambda entry: entry[0])
    best.provenance = {**best.provenance, "method": RANDOM_BEST, "k": count, "chosen_seed": best_seed,
                       "chosen_by": "least held-out cross-entropy of the quantized full-precision model",
                       "held_out_loss": {str(seed): round(value, 6) for value, seed, _ in tried},
                       "samples": loss.samples, "seconds": round(time.time() - started, 3)}
    return best


def _derived(spec: str, model_name: str, layers: list[LayerCost], total_params: int, geometry: Geometry, qcfg,
             search_cfg, reference: Reference | None) -> Policy:
    """`hawq` or `sensitivity`: `Omega_l(w, a)` measured on `reference` for every searched layer and
    pair of the search's candidates, then the policy of the least `sum_l Omega_l` within the budget."""
    reference = _needs_reference(spec, reference)
    fixed_bits, fixed, cw, ca, limits = _search_space(spec, layers, qcfg, search_cfg)
    if limits is None:
        raise MPQError(f"policy={spec} needs search.budget_uniform_bits, search.budget_bitops or search.budget_size_mb")
    searched = [layer.name for layer in layers if not (layer.name in fixed and fixed_bits)]
    started = time.time()
    model = reference.model.to(reference.device)
    batches = reference.batches()
    loaded = time.time()
    if spec == HAWQ:
        measured = hawq_sensitivity(model, batches, searched, cw, ca, qcfg, reference.probes, reference.seed,
                                    reference.hold_graphs)
    else:
        measured = loss_sensitivity(model, batches, searched, cw, ca, qcfg)
    scores = measured.scores()
    best = {name: max(pairs, key=pairs.__getitem__) for name, pairs in scores.items()}  # the unconstrained optimum
    given = {layer.name: best.get(layer.name) or (fixed_bits, fixed_bits) for layer in layers}
    fill = float(getattr(search_cfg, "budget_fill", DEFAULT_FILL))
    bits, record = fit_scores_to_budget(layers, given, scores, {name: (cw, ca) for name in searched}, limits,
                                        total_params, fill=fill)
    measurement = measured.record()
    for name, entry in measurement["layers"].items():
        entry["omega"] = measured.omega(name, *bits[name])  # of the chosen pair
    provenance = {"method": spec, "candidates_w": cw, "candidates_a": ca, "seed": reference.seed, **measurement,
                  "minimises": "sum_l Omega_l(w_l, a_l)", "load_seconds": round(loaded - started, 3),
                  "seconds": round(time.time() - loaded, 3), "fit": record}
    target = cost_at(layers, bits, total_params, geometry.input_size, geometry.in_channels)
    return make_policy(model_name, layers, bits, fixed, {"target": target}, budget=limits.as_budget(),
                       provenance=provenance)


def quantize_with_policy(model: nn.Module, policy: Policy, qcfg, layers: list[LayerCost]) -> nn.Module:
    """Convert `model` in place to fixed precision under `policy` (layers give each layer's MACs)."""
    try:
        return quantize_model(model, policy.bits(), qcfg, layers)
    except ValueError as err:
        raise MPQError(f"cannot apply the policy: {err}") from None


def quant_meta(policy: Policy, qcfg) -> dict:
    """What a quantized checkpoint records in `meta.json` so `evaluate` can rebuild the model."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(qcfg, resolve=True) if not isinstance(qcfg, dict) else dict(qcfg)
    return {"policy": policy.model_dump(by_alias=True, mode="json"), "config": config}


@torch.no_grad()
def calibrate(model: nn.Module, loader, device: torch.device) -> None:
    """Initialise data-dependent quantizers (LSQ step sizes) on one training batch (LSQ's init)."""
    model.eval()
    images, _ = next(iter(loader))
    model(images.to(device))
