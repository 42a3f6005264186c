"""Policy specifications resolved on the untrained model, before any compute.

A malformed spec, an unsupported width, a policy file of another model or a budget no policy meets
is one error line in seconds, not after a pretraining. `hawq`, `sensitivity` and `random-best:<K>`
are measured on the pretrained model later; here only their budget (and K) is checked.
"""

from __future__ import annotations

from omegaconf import DictConfig

from framework.data import build_dataset, get_dataset_spec
from framework.errors import MPQError
from framework.policy import budget_from_config, uniform_frontier
from framework.quant.convert import fixed_bits_of, fixed_layer_names
from framework.quant.cost import float_parameter_count, trace_layers
from framework.stage.models import build_model, model_meta
from framework.stage.policies import HAWQ, SENSITIVITY, Geometry, parse_random_best, resolve_policy


def _untrained(cfg: DictConfig):
    """The untrained `cfg.model` (its meta) and the geometry of `cfg.data`."""
    data_spec = get_dataset_spec(str(cfg.data.name))
    num_classes = data_spec.num_classes or build_dataset(cfg.data, "test").mpq_info["num_classes"]
    meta = model_meta(cfg, num_classes)
    return meta, Geometry(int(cfg.data.input_size or data_spec.native_size or 28), int(cfg.data.channels))


def uniform_frontier_specs(cfg: DictConfig) -> list[str]:
    """`uniform:W/A` of every split of the uniform frontier of `cfg.search`'s budget and candidates
    (framework.policy.uniform_frontier) for `cfg.model`; one :class:`MPQError` without a budget."""
    meta, geometry = _untrained(cfg)
    model = build_model(meta)
    layers = trace_layers(model, geometry.input_size, geometry.in_channels)
    fixed_bits = fixed_bits_of(cfg.quant)
    fixed = fixed_layer_names(layers, fixed_bits)
    limits = budget_from_config(cfg.search, layers, fixed, fixed_bits)
    if limits is None:
        raise MPQError("the uniform baseline needs search.budget_uniform_bits, search.budget_bitops or search.budget_size_mb")
    cw, ca = (sorted(int(b) for b in c) for c in (cfg.search.quant.candidates_w, cfg.search.quant.candidates_a))
    frontier = uniform_frontier(layers, cw, ca, fixed, fixed_bits, limits, float_parameter_count(model))
    if not frontier:  # the same error line as policy=uniform-budget
        check_policy_spec(cfg, "uniform-budget")
    return [f"uniform:{w}/{a}" for w, a in frontier]


def check_policy_spec(cfg: DictConfig, spec: str, key: str = "policy") -> None:
    """Resolve `spec` (the value of option `key`) for `cfg.model` at `cfg.data`'s geometry under
    `cfg.quant` and `cfg.search`'s candidates and budget; raise one :class:`MPQError` if it cannot be."""
    meta, geometry = _untrained(cfg)
    if spec in (HAWQ, SENSITIVITY) or parse_random_best(spec) is not None:
        layers = trace_layers(build_model(meta), geometry.input_size, geometry.in_channels)
        fixed_bits = fixed_bits_of(cfg.quant)
        if budget_from_config(cfg.search, layers, fixed_layer_names(layers, fixed_bits), fixed_bits) is None:
            raise MPQError(f"{key}={spec} needs search.budget_uniform_bits, search.budget_bitops or "
                           f"search.budget_size_mb")
        return
    resolve_policy(spec, meta["name"], lambda: build_model(meta), geometry, cfg.quant, search_cfg=cfg.search)
