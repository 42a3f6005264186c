"""Every experiment in conf/experiment/ composes and runs end to end: `mpq pipeline experiment=<name>`
in a subprocess, shrunk to a few steps of every stage (as lightning-hydra-template runs each of its
experiment configs). The run must be the config Hydra's compose API gives for the same overrides,
with every value the experiment file sets that the shrink leaves alone. `smoke` is small already: it
runs unshrunk, once per session (the `smoke_pipeline` fixture, which the command test also checks);
the other experiments' runs are slow (`make test-all`), and every experiment composes and validates
in the fast tier."""

import pytest
import yaml
from omegaconf import OmegaConf

from framework.config import validate_config
from framework.paths import CONF_DIR
from framework.stage.checks import uniform_frontier_specs
from tests.conftest import compose_config, read_result, run_stage

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
STEPS = {"pretrain": 3, "search": 2, "finetune": 2}
# A few hundred images where the experiment would read thousands, a few steps of every stage and
# no loader workers; the data fraction an experiment sets stays its own (max_steps bounds it).
SHRINK = [
    f"train.max_steps={STEPS['pretrain']}", f"search.max_steps={STEPS['search']}", f"finetune.max_steps={STEPS['finetune']}",
    "data.test_fraction=0.02", "proxy.fraction=0.01", "proxy.test_fraction=0.02", "data.num_workers=0",
]
SLOW = set(EXPERIMENTS) - {"smoke"}  # a pipeline of its own each (a minute or more on 2 cores): `make test-all`
SMOKE_STEPS = {"pretrain": 20, "search": 6, "finetune": 6}  # conf/experiment/smoke.yaml's own max_steps


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    """`{"a.b": value}` for every leaf of a nested mapping."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed_keeping_what_it_sets(name, overrides):
    """The pipeline config of experiment `name` with `overrides`; every value the experiment's file
    sets that the overrides leave alone is in it."""
    cfg = compose_config("pipeline", overrides)
    written = _leaves(yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()))
    shrunk = {item.split("=", 1)[0] for item in overrides}
    kept = {key: value for key, value in written.items() if key not in shrunk}
    assert kept, f"the shrink overrides everything experiment {name} sets"
    for key, value in kept.items():
        assert OmegaConf.select(cfg, key) == value, key
    return cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_keeps_what_it_sets_and_validates(tmp_path, name):
    """What the run below checks before it starts, for every experiment, in-process."""
    overrides = [f"experiment={name}"] if name == "smoke" else [f"experiment={name}", *SHRINK]
    validate_config(composed_keeping_what_it_sets(name, overrides))  # what `mpq pipeline` checks first


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPERIMENTS])
def test_every_experiment_composes_and_runs_a_few_steps_of_every_stage(tmp_path, name, request):
    if name == "smoke":
        shared = request.getfixturevalue("smoke_pipeline")
        overrides, run_dir, aim_repo, steps = shared["overrides"], shared["run_dir"], shared["aim_repo"], SMOKE_STEPS
        assert shared["proc"].returncode == 0, shared["proc"].stderr[-2000:]
    else:
        run_dir, aim_repo, steps = tmp_path / "run", tmp_path / "aim", STEPS
        overrides = [f"experiment={name}", *SHRINK, f"tracking.repo={aim_repo}"]
    cfg = composed_keeping_what_it_sets(name, overrides)

    result = read_result(run_dir) if name == "smoke" else run_stage("pipeline", run_dir, *overrides)
    # the command ran exactly the composed config (run_dir is Hydra's output folder, set by `mpq`)
    ran = result["config"]
    expected = OmegaConf.to_container(cfg, resolve=True)
    assert ran.pop("run_dir") == str(run_dir) and expected.pop("run_dir") is None
    assert ran == expected

    again = [f"{name}_seed{cfg.seed + i}" for i in range(1, cfg.pipeline.seeds) for name in ("finetune", "finetune_baseline")]
    splits = [f"finetune_baseline_{spec.split(':', 1)[1].replace('/', '-')}" for spec in uniform_frontier_specs(cfg)]
    assert [row["stage"] for row in result["stages"]] == [
        "pretrain", "search", "finetune", "evaluate", "export", *splits, "evaluate_baseline", *again]
    stages = {row["stage"]: read_result(run_dir / row["stage"]) for row in result["stages"]}
    for stage, count in steps.items():
        assert stages[stage]["metrics"]["steps"] == count, stage
    assert stages["finetune"]["config"]["init_checkpoint"] == stages["pretrain"]["artifacts"]["checkpoint"]
    assert stages["evaluate"]["config"]["checkpoint"] == stages["finetune"]["artifacts"]["checkpoint"]
    assert result["metrics"]["top1"] == stages["evaluate"]["metrics"]["top1"]
    assert {stage["config"]["experiment_name"] for stage in stages.values()} == {cfg.experiment_name}
    assert all(stage["tracking"]["repo"] == str(aim_repo) for stage in stages.values())
