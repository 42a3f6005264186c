"""The sweep's search space: `tune.space` in the config -> Ray Tune domains -> the points to run.

`tune.space` mirrors the config: each leaf is one spec, a mapping with exactly one of

    {grid: [v, ...]}          every value (a grid dimension)
    {choice: [v, ...]}        one value drawn per sample
    {uniform: [lo, hi]}       a float drawn uniformly
    {loguniform: [lo, hi]}    a float drawn uniformly in log space (learning rates, weights)
    {randint: [lo, hi]}       a whole number in [lo, hi)
    {range: [start, stop]}    a grid of whole numbers, `range(start, stop[, step])` (seeds)

so `space: {search: {lr_logits: {loguniform: [0.003, 0.03]}}, seed: {range: [0, 4]}}` sweeps two
keys. Dotted keys (`search.lr_logits: {...}`) work as well. Grids are crossed; random dimensions are
drawn `tune.num_samples` times per grid point, by Ray Tune's own variant generator with a seeded
generator, so the same config always gives the same points (and a restored sweep the same plan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.errors import MPQError

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "range")
#: the top-level config keys a sweep may vary: the search (its method group and any value), the
#: proxy data, the seed. The model, the target and the checkpoint are the sweep's, not a trial's.
SWEEPABLE = ("search", "proxy", "seed")
_EXAMPLE = "e.g. tune.space.seed='{range: [0, 4]}' or tune.space.search.lr_logits='{loguniform: [0.003, 0.03]}'"


@dataclass(frozen=True)
class Dimension:
    """One swept config key (`key`, dotted) and its spec (`kind`, `values`)."""

    key: str
    kind: str
    values: tuple

    def domain(self) -> Any:
        """The Ray Tune domain (or grid) that samples this dimension."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "range":
            return tune.grid_search(list(range(*self.values)))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(*self.values)

    @property
    def is_grid(self) -> bool:
        return self.kind in ("grid", "range")


def _leaves(node: Mapping, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, value in node.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and value and set(value) & set(SPEC_KINDS):
            if not set(value) <= set(SPEC_KINDS):
                raise MPQError(f"tune.space.{key} mixes a spec ({', '.join(sorted(set(value) & set(SPEC_KINDS)))}) "
                               f"with config keys ({', '.join(sorted(set(value) - set(SPEC_KINDS)))}); give one or the other")
            yield key, value
        elif isinstance(value, Mapping) and value:
            yield from _leaves(value, key)
        else:
            raise MPQError(f"tune.space.{key}={value!r} is not a spec: give one of {{grid: [...]}}, {{choice: [...]}}, "
                           f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}, {{range: [start, stop]}}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_spec(key: str, kind: str, values: Any) -> tuple:
    where = f"tune.space.{key}.{kind}={values!r}"
    if not isinstance(values, (list, tuple)):
        raise MPQError(f"{where} is invalid: expected a list")
    values = tuple(values)
    if kind in ("grid", "choice"):
        if not values:
            raise MPQError(f"{where} is invalid: give at least one value")
        return values
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(map(_is_number, values)) or not values[0] < values[1]:
            raise MPQError(f"{where} is invalid: expected [lo, hi] with lo < hi")
        if kind == "loguniform" and values[0] <= 0:
            raise MPQError(f"{where} is invalid: a log-uniform range needs lo > 0")
        return tuple(float(v) for v in values)
    if kind == "randint":
        if len(values) != 2 or not all(map(_is_whole, values)) or not values[0] < values[1]:
            raise MPQError(f"{where} is invalid: expected whole numbers [lo, hi] with lo < hi (hi is excluded)")
        return values
    if len(values) not in (2, 3) or not all(map(_is_whole, values)) or (len(values) == 3 and values[2] == 0) \
            or not list(range(*values)):
        raise MPQError(f"{where} is invalid: expected whole numbers [start, stop] or [start, stop, step] giving at least one value")
    return values


def parse_space(space: Mapping | DictConfig | None) -> list[Dimension]:
    """The dimensions of `tune.space`, checked: one spec per key, valid values, sweepable keys."""
    if isinstance(space, DictConfig):
        space = OmegaConf.to_container(space, resolve=True)
    if not space:
        raise MPQError(f"tune.space is empty: give at least one key to sweep, {_EXAMPLE}")
    dimensions: dict[str, Dimension] = {}
    for key, spec in _leaves(space, ""):
        if len(spec) != 1:
            raise MPQError(f"tune.space.{key} gives {len(spec)} specs ({', '.join(spec)}); give exactly one")
        if key.split(".")[0] not in SWEEPABLE or key in ("search", "proxy"):
            raise MPQError(f"tune.space.{key}: a sweep varies search.* (search.method for the method), proxy.* or seed, "
                           f"not {key}; {_EXAMPLE}")
        if key in dimensions:
            raise MPQError(f"tune.space.{key} is given twice (once nested, once dotted); keep one")
        kind, values = next(iter(spec.items()))
        dimensions[key] = Dimension(key, kind, _check_spec(key, kind, values))
    return list(dimensions.values())


def check_known(dimensions: list[Dimension], known: Callable[[str], bool]) -> None:
    """Refuse a dimension whose key names no value of the config (`known(key)` is False), so a typo
    such as `search.lr_logit` is an error, not trials that silently sweep nothing."""
    for dim in dimensions:
        if not known(dim.key):
            raise MPQError(f"tune.space.{dim.key}: the config has no key {dim.key}; sweep an existing value "
                           f"(see `mpq search --cfg job`), {_EXAMPLE}")


def _plain(value: Any) -> Any:
    """NumPy scalars (from Ray's samplers) as Python numbers, so configs and JSON take them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


def expand(dimensions: list[Dimension], num_samples: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Every point of the space, in a fixed order: the grid crossed, random dimensions drawn
    `num_samples` times per grid point (Ray Tune's variant generator, one seeded generator).

    Points may repeat (a choice drawn twice, a grid with `num_samples > 1` and nothing random):
    the plan keeps the first of identical trials.
    """
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    if num_samples < 1:
        raise MPQError(f"tune.num_samples={num_samples!r} is invalid: expected a whole number >= 1")
    spec = {d.key: d.domain() for d in dimensions}
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(num_samples):
        for _, resolved in generate_variants(spec, random_state=rng):
            points.append({d.key: _plain(resolved[d.key]) for d in dimensions})
    return points
