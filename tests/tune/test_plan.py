"""The sweep's space and plan from real composed configs: points, method groups, distinct trials, errors."""

import pytest
from omegaconf import OmegaConf

from framework.errors import MPQError
from framework.tune.plan import make_plan
from framework.tune.space import expand, parse_space
from tests.conftest import compose_config


def plan_of(*overrides):
    return make_plan(compose_config("sweep", ["init_checkpoint=/nonexistent/ckpt", "~tune.space", *overrides]))


def test_grids_are_crossed_and_random_dimensions_drawn_per_sample_reproducibly():
    dims = parse_space({"seed": {"range": [0, 2]}, "search": {"lr_logits": {"loguniform": [0.001, 0.1]}}})
    points = expand(dims, num_samples=3, seed=7)
    assert len(points) == 6
    assert sorted(p["seed"] for p in points) == [0, 0, 0, 1, 1, 1]
    assert all(0.001 <= p["search.lr_logits"] <= 0.1 and type(p["search.lr_logits"]) is float for p in points)
    assert expand(dims, num_samples=3, seed=7) == points
    assert expand(dims, num_samples=3, seed=8) != points


def test_every_spec_kind_gives_values_of_its_kind():
    dims = parse_space({"search": {"method": {"choice": ["dnas", "asga"]}, "complexity": {"weight": {"uniform": [0.5, 2.0]}},
                                   "sharpness": {"rho": {"grid": [0.05, 0.1]}}},
                        "proxy": {"per_class": {"randint": [10, 20]}}})
    for point in expand(dims, num_samples=4, seed=0):
        assert point["search.method"] in ("dnas", "asga") and 0.5 <= point["search.complexity.weight"] <= 2.0
        assert point["search.sharpness.rho"] in (0.05, 0.1) and 10 <= point["proxy.per_class"] < 20
        assert type(point["proxy.per_class"]) is int


def test_identical_trial_configs_are_planned_once():
    plan = plan_of("+tune.space={seed: {grid: [0, 1, 0]}}", "tune.num_samples=2")
    assert [t.overrides for t in plan.trials] == [{"seed": 0}, {"seed": 1}]
    assert len(plan.duplicates) == 4
    # spelling out a default is the same search, hence the same trial
    plan = plan_of("+tune.space={search: {sharpness: {rho: {grid: [0.05, 0.1]}}}}", "search.sharpness.rho=0.05",
                   "+tune.space.seed={grid: [0]}")
    assert len(plan.trials) == 2 and len({t.key for t in plan.trials}) == 2


def test_a_method_dimension_swaps_the_method_group_and_keeps_the_sweeps_search_overrides():
    plan = plan_of("+tune.space={search: {method: {grid: [dnas, seam_asga]}}}", "search.max_steps=3", "search.batch_size=40")
    configs = {t.overrides["search.method"]: plan.config(t) for t in plan.trials}
    assert configs["dnas"].search.sharpness.name == "none" and configs["dnas"].search.margin.weight == 0.0
    assert configs["seam_asga"].search.sharpness.name == "asga" and configs["seam_asga"].search.margin.weight == 0.5
    assert all(c.search.max_steps == 3 and c.search.batch_size == 40 for c in configs.values())
    assert all(c.stage == "search" and c.init_checkpoint == "/nonexistent/ckpt" for c in configs.values())


def test_keys_of_one_method_may_be_swept_beside_another():
    plan = plan_of("search=dnas", "+tune.space={search: {method: {grid: [asga]}, sharpness: {lookback: {grid: [0.001, 0.01]}}}}")
    assert [plan.config(t).search.sharpness.lookback for t in plan.trials] == [0.001, 0.01]


def test_trial_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = make_plan(compose_config("sweep", ["init_checkpoint=ckpt/last", "tracking.repo=aimrepo"]))
    cfg = plan.config(plan.trials[0])
    assert cfg.init_checkpoint == str(tmp_path / "ckpt" / "last") and cfg.tracking.repo == str(tmp_path / "aimrepo")


@pytest.mark.parametrize("overrides, message", [
    (["+tune.space={}"], "tune.space is empty"),
    (["+tune.space={search: {lr_logit: {grid: [0.1]}}}"], r"tune.space.search.lr_logit: the config has no key"),
    (["+tune.space={model: {name: {grid: [resnet20]}}}"], r"tune.space.model.name: a sweep varies search.*"),
    (["+tune.space={seed: [0, 1]}"], r"tune.space.seed=\[0, 1\] is not a spec"),
    (["+tune.space={seed: {grid: [0], choice: [1]}}"], "gives 2 specs"),
    (["+tune.space={search: {lr_logits: {loguniform: [0, 0.1]}}}"], "log-uniform range needs lo > 0"),
    (["+tune.space={seed: {range: [3, 3]}}"], r"tune.space.seed.range=\[3, 3\] is invalid"),
    (["+tune.space={search: {method: {grid: [asgd]}}}"], "unknown method 'asgd'; choose from asga, dnas, seam, seam_asga"),
    (["+tune.space={search: {lr_weights: {grid: [-0.1]}}}"], r"trial search.lr_weights=-0.1 .* expected a number >= 0"),
])
def test_bad_spaces_are_one_error_naming_the_key(overrides, message):
    with pytest.raises(MPQError, match=message):
        plan_of(*overrides)


def test_the_default_space_is_two_methods_by_two_seeds():
    plan = make_plan(compose_config("sweep", ["init_checkpoint=/x"]))
    assert sorted((t.overrides["search.method"], t.overrides["seed"]) for t in plan.trials) == [
        ("asga", 0), ("asga", 1), ("dnas", 0), ("dnas", 1)]
    assert OmegaConf.select(plan.config(plan.trials[0]), "tune") is None


def test_a_trial_runs_the_search_mpq_search_would_run_with_its_overrides():
    common = ["init_checkpoint=/x", "search=seam", "search.max_steps=3", "proxy.per_class=20"]
    plan = make_plan(compose_config("sweep", [*common, "~tune.space",
                                              "+tune.space={seed: {grid: [3]}, search: {method: {grid: [dnas]}}}"]))
    (trial,) = plan.trials
    alone = compose_config("search", [*common, "search=dnas", "seed=3"])
    trial_cfg = plan.config(trial)
    for key in ("search", "proxy", "data", "model", "train", "quant", "seed", "init_checkpoint"):
        assert OmegaConf.to_container(trial_cfg, resolve=True)[key] == OmegaConf.to_container(alone, resolve=True)[key], key
    assert trial_cfg.proxy.seed == 3  # the seed reaches the proxy subset, as `seed=3` does for mpq search
