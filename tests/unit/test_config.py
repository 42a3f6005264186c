"""Every config composes; bad values are refused with a message naming the key."""

import pytest
from omegaconf import OmegaConf

from framework.config_checks import check_config
from framework.errors import MPQError
from framework.paths import CONF_DIR
from tests.conftest import compose_config

GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir())


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_group_option_composes_and_passes_checks(group, option):
    cfg = compose_config("pretrain", [f"{group}={option}"])
    check_config(cfg)
    if group in ("data", "proxy", "model"):
        assert cfg[group].name == option
    assert cfg.stage == "pretrain"


def test_contract_names_exist_in_the_default_config():
    """The config names DESIGN.md promises to users and docs."""
    cfg = compose_config("pretrain")
    for key in (
        "data.fraction", "proxy.fraction", "data.loader", "train.epochs", "train.max_steps",
        "train.batch_size", "seed", "init_checkpoint", "policy", "dist.nproc", "tracking.repo",
        "tracking.enabled", "launcher.name",
    ):
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else cfg
        assert leaf in parent, key


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=abc", "train.batch_size"),
        ("data.fraction=1.5", "data.fraction"),
        ("data.channels=2", "data.channels"),
        ("proxy.per_class=0", "proxy.per_class"),
        ("train.optim.lr=-1", "train.optim.lr"),
        ("search.sharpness.name=sharp", "search.sharpness.name"),
        ("search.complexity.penalty=cubic", "search.complexity.penalty"),
        ("search.quant.candidates_w=[2,9]", "search.quant.candidates_w"),
        ("search.epochs=0", "search.epochs"),
        ("search.budget_bitops=-5", "search.budget_bitops"),
        ("finetune.sharpness.saq_case=4", "finetune.sharpness.saq_case"),
        ("finetune.epochs=0", "finetune.epochs"),
        ("quant.weight=fancy", "quant.weight"),
        ("dist.zero_stage=4", "dist.zero_stage"),
        ("dist.precision=fp8", "dist.precision"),
        ("dist.gradient_accumulation=0", "dist.gradient_accumulation"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    cfg = compose_config("pretrain", [override])
    with pytest.raises(MPQError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_dist_nproc_is_for_the_training_stages_only():
    check_config(compose_config("finetune", ["dist.nproc=2"]))
    with pytest.raises(MPQError, match="dist.nproc=2 applies to pretrain and finetune"):
        check_config(compose_config("search", ["dist.nproc=2"]))


def test_hydra_flags_and_overrides_are_separated_in_any_order():
    from launchers.cli import split_hydra_args

    assert split_hydra_args(["a=1", "--cfg", "job", "b=2", "--multirun", "c=3,4"]) == (
        ["--cfg", "job", "--multirun"], ["a=1", "b=2", "c=3,4"])
    assert split_hydra_args(["--info", "defaults", "x=1", "-m"]) == (["--info", "defaults", "-m"], ["x=1"])
    assert split_hydra_args(["~key", "+new=1", "--resolve"]) == (["--resolve"], ["~key", "+new=1"])
