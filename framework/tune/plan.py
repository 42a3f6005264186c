"""The sweep's plan: one trial config per distinct point of the space, each named by its key.

A trial is `mpq search` under the sweep's config with the point's overrides applied. Its *key* is
a hash of the resolved trial config without the keys that do not change what the search computes
(run directory, tracking, launcher, the sweep's own settings...), so two points that give the same
search (a seed drawn twice, `search.sharpness.rho=0.05` spelled out where it is the default) are
one trial, run once. The key names the trial's folder, `<run_dir>/trials/<key>/`.

`search.method` swaps the method's config group (conf/search/<method>.yaml) as `search=<method>`
would; the values the sweep's config changed in `search` (its overrides, an experiment's) are
applied on top of every method's own defaults, so `search.max_steps=3` holds for all methods.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.config import validate_config
from framework.errors import MPQError
from framework.paths import CONF_DIR
from framework.results import config_to_dict
from framework.tune.space import Dimension, check_known, expand, parse_space

#: top-level keys that do not change what a search computes: left out of a trial's key
NOT_IN_KEY = frozenset({
    "run_dir", "resume", "tracking", "experiment_name", "tune", "stage", "threads", "checkpoint_every", "pipeline",
    "finetune", "launcher", "dist", "trial", "checkpoint", "policy", "input_size", "in_channels", "num_classes", "hydra",
})


@dataclass(frozen=True)
class TrialSpec:
    """One planned trial: its position in the plan, its key, and the overrides of its point."""

    index: int
    key: str
    overrides: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """The distinct trials of a sweep and what each one's config is built from."""

    trials: list[TrialSpec]
    base: dict[str, Any]                 # the sweep's resolved config, paths made absolute
    methods: dict[str, dict[str, Any]]   # the `search` node of every method the space names
    dimensions: list[Dimension] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # points that repeated an earlier trial

    def config(self, trial: TrialSpec) -> DictConfig:
        return trial_config(self.base, self.methods, trial.overrides)


def trial_config(base: dict[str, Any], methods: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> DictConfig:
    """The config of one trial: `base` with the point's `overrides` (dotted keys) applied."""
    cfg = OmegaConf.create(base)
    method = overrides.get("search.method")
    if method is not None:
        cfg.search = OmegaConf.create(methods[method])
    for key, value in overrides.items():
        if key != "search.method":
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    with open_dict(cfg):
        cfg.stage = "search"
    return cfg


def trial_key(cfg: DictConfig | dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the trial config's search-relevant part (sorted JSON)."""
    data = config_to_dict(cfg) if isinstance(cfg, DictConfig) else cfg
    relevant = {k: v for k, v in data.items() if k not in NOT_IN_KEY}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _compose_search(method: str) -> dict[str, Any]:
    """The `search` node `search=<method>` gives, from conf/ (inside or outside a Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"search={method}", "stage=search"]
    if GlobalHydra.instance().is_initialized():
        node = compose("config", overrides=overrides).search
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = compose("config", overrides=overrides).search
    return OmegaConf.to_container(node, resolve=True)


def _changes(actual: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The parts of `actual` that differ from `default` (nested)."""
    out: dict[str, Any] = {}
    for key, value in actual.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            inner = _changes(value, default[key])
            if inner:
                out[key] = inner
        elif key not in default or default[key] != value:
            out[key] = value
    return out


def _has(node: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _base(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's config as every trial starts from it: interpolations kept (a trial's `seed`
    must reach `proxy.seed`, which is `${seed}`), but the paths resolved here and made absolute
    (trials run in Ray workers, with another working directory and maybe another environment)."""
    base = OmegaConf.to_container(cfg, resolve=False)
    for key in ("tune", "hydra", "launcher"):  # the sweep's own; `launcher` may point into Hydra's runtime
        base.pop(key, None)
    if cfg.init_checkpoint:
        base["init_checkpoint"] = str(Path(cfg.init_checkpoint).resolve())
    repo = str(cfg.tracking.repo)
    base["tracking"]["repo"] = repo if repo.startswith("aim://") else str(Path(repo).resolve())
    for node in ("data", "proxy"):
        if cfg[node].root:
            base[node]["root"] = str(Path(cfg[node].root).resolve())
        if cfg[node].ffcv.dir:
            base[node]["ffcv"]["dir"] = str(Path(cfg[node].ffcv.dir).resolve())
    return base


def available_methods() -> list[str]:
    """The search methods with a config file in conf/search/."""
    return sorted(p.stem for p in (CONF_DIR / "search").glob("*.yaml") if not p.stem.startswith("_"))


def make_plan(cfg: DictConfig) -> Plan:
    """Check `cfg.tune` and build the sweep's trials (distinct, each config checked like `mpq search`'s).

    Bad input is one :class:`MPQError` naming the key: an empty space, an unknown or unsweepable
    key, an invalid spec, an unknown method, or a trial config `mpq search` would refuse.
    """
    tcfg = cfg.tune
    base = _base(cfg)

    space = OmegaConf.to_container(tcfg.space, resolve=True) if tcfg.space is not None else None
    dimensions = parse_space(space)
    methods: dict[str, dict[str, Any]] = {}
    for dim in dimensions:
        if dim.key != "search.method":
            continue
        if dim.kind not in ("grid", "choice"):
            raise MPQError(f"tune.space.search.method: methods are swept with {{grid: [...]}} or {{choice: [...]}}, not {dim.kind}")
        unknown = [name for name in dim.values if name not in available_methods()]
        if unknown:
            raise MPQError(f"tune.space.search.method: unknown method {unknown[0]!r}; choose from {', '.join(available_methods())}")
        sweep_search = OmegaConf.to_container(cfg.search, resolve=True)
        user_changes = _changes(sweep_search, _compose_search(str(sweep_search["method"])))
        for name in dim.values:
            methods[name] = OmegaConf.to_container(OmegaConf.merge(_compose_search(name), user_changes), resolve=True)

    def known(key: str) -> bool:
        if key == "search.method":
            return True
        if key.startswith("search."):
            return _has(base["search"], key[7:]) or any(_has(node, key[7:]) for node in methods.values())
        return _has(base, key)

    check_known(dimensions, known)
    points = expand(dimensions, int(tcfg.num_samples), int(tcfg.space_seed))
    trials: list[TrialSpec] = []
    duplicates: list[dict[str, Any]] = []
    seen: set[str] = set()
    for point in points:
        trial_cfg = trial_config(base, methods, point)
        try:
            validate_config(trial_cfg)
        except MPQError as err:
            raise MPQError(f"the trial {_describe(point)} of tune.space is invalid: {err}") from None
        key = trial_key(trial_cfg)
        if key in seen:
            duplicates.append(point)
            continue
        seen.add(key)
        trials.append(TrialSpec(len(trials), key, point))
    return Plan(trials=trials, base=base, methods=methods, dimensions=dimensions, duplicates=duplicates)


def _describe(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())
