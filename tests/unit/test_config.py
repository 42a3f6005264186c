"""Every config composes and validates; bad values are one line naming the full key; the config files
build on each other (search.quant is the minmax group, the proxies and datasets share a base)."""

import pytest
from omegaconf import OmegaConf

from framework.config import validate_config
from framework.errors import MPQError
from framework.paths import CONF_DIR
from framework.stages import STAGES as REGISTERED_STAGES
from tests.conftest import compose_config

STAGES = list(REGISTERED_STAGES)
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and not d.name.startswith("_"))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml")) if not p.stem.startswith("_")]


def _container(*overrides, stage="pretrain"):
    return OmegaConf.to_container(compose_config(stage, list(overrides)), resolve=True)


@pytest.mark.parametrize("stage", STAGES)
def test_the_default_config_of_every_stage_is_valid(stage):
    validate_config(compose_config(stage))


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_group_option_composes_and_is_valid(group, option):
    cfg = compose_config("pretrain", [f"{group}={option}"])
    validate_config(cfg)
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


@pytest.mark.parametrize("override,message", [
    # root keys
    ("seed=-1", "seed=-1 is invalid: expected a whole number >= 0"),
    ("threads=0", "threads=0 is invalid: expected a whole number >= 1"),
    ("checkpoint_every=-1", "checkpoint_every=-1 is invalid: expected a whole number >= 0"),
    ("resume=maybe", "resume='maybe' is invalid: expected true or false"),
    ("device=gpu", "device='gpu' is invalid: expected auto, cpu, cuda or cuda:<index>"),
    ("prepare.splits=[train,valid]", "prepare.splits=['train', 'valid'] is invalid: unknown or no split ['valid']; "
                                     "choose a list from train, test"),
    ("pipeline.sweep=1", "pipeline.sweep=1 is invalid: expected true or false"),
    # data and proxy (one schema)
    ("data.fraction=1.5", "data.fraction=1.5 is invalid: expected a fraction in (0, 1]"),
    ("data.channels=2", "data.channels=2 is invalid: choose one of 1, 3"),
    ("data.name=cifar10", "data.name='cifar10' is invalid: choose one of fashion_mnist, imagefolder, mnist"),
    ("data.loader=dali", "data.loader='dali' is invalid: choose one of torch, ffcv"),
    ("data.ffcv.order=sequential", "data.ffcv.order='sequential' is invalid: choose one of random, quasi_random"),
    ("data.ffcv.write.mode=png", "data.ffcv.write.mode='png' is invalid: choose one of raw, jpg, proportion"),
    ("data.ffcv.write.jpeg_quality=0", "data.ffcv.write.jpeg_quality=0 is invalid: expected a whole number in 1-100"),
    ("proxy.per_class=0", "proxy.per_class=0 is invalid: expected a whole number >= 1"),
    ("proxy.test_fraction=0", "proxy.test_fraction=0 is invalid: expected a fraction in (0, 1]"),
    # model
    ("model.name=resnet9", "model.name='resnet9' is invalid: choose one of mobilenet_v2, resnet18, resnet20, resnet50, "
                           "resnet8"),
    ("model.options=3", "model.options=3 is invalid: expected a mapping"),
    # train
    ("train.epochs=0", "train.epochs=0 is invalid: expected a whole number >= 1"),
    ("train.batch_size=abc", "train.batch_size='abc' is invalid: expected a whole number >= 1"),
    ("train.optim.lr=-1", "train.optim.lr=-1 is invalid: expected a number >= 0"),
    ("train.optim.name=lion", "train.optim.name='lion' is invalid: choose one of sgd, adamw"),
    ("train.optim.betas=[0.9]", "train.optim.betas=[0.9] is invalid: expected two numbers in [0, 1)"),
    # finetune
    ("finetune.epochs=0", "finetune.epochs=0 is invalid: expected a whole number >= 1"),
    ("finetune.sharpness.saq_case=4", "finetune.sharpness.saq_case=4 is invalid: choose one of 1, 2, 3"),
    ("finetune.sharpness.name=sharp", "finetune.sharpness.name='sharp' is invalid: choose one of none, sam, asam, asga, saq"),
    # quant and search.quant
    ("quant.weight=fancy", "quant.weight='fancy' is invalid: choose one of lsq, minmax"),
    ("quant.activation=minmax", "quant.activation='minmax' is invalid: choose one of lsq, learned_range"),
    ("quant.fixed_bits=1", "quant.fixed_bits=1 is invalid: expected a bit-width from [2, 3, 4, 5, 6, 7, 8, 32], or null"),
    ("search.quant.candidates_w=[2,9]", "search.quant.candidates_w=[2, 9] is invalid: unknown or no bit-width [9]"),
    ("search.quant.candidates_a=[]", "search.quant.candidates_a=[] is invalid: unknown or no bit-width []"),
    # search
    ("search.epochs=0", "search.epochs=0 is invalid: expected a whole number >= 1"),
    ("search.budget_bitops=-5", "search.budget_bitops=-5 is invalid: expected a number > 0"),
    ("search.budget_uniform_bits=1", "search.budget_uniform_bits=1 is invalid: expected a number in [2, 32]"),
    ("search.budget_uniform_bits=33.5", "search.budget_uniform_bits=33.5 is invalid: expected a number in [2, 32]"),
    ("search.budget_size_mb=0", "search.budget_size_mb=0 is invalid: expected a number > 0"),
    ("search.budget_fill=1.5", "search.budget_fill=1.5 is invalid: expected a number in [0, 1]"),
    ("~search.budget_fill", "search.budget_fill is missing from the config"),
    ("search.complexity.penalty=cubic", "search.complexity.penalty='cubic' is invalid: choose one of linear, hinge"),
    ("search.sharpness.name=foo", "search.sharpness.name='foo' is invalid: choose one of none, sam, asam, asga"),
    ("search.sharpness.name=saq", "search.sharpness.name='saq' is invalid: choose one of none, sam, asam, asga"),
    ("search.sharpness.rho_min=0.5", "search.sharpness.rho_min=0.5 is invalid: expected rho_min <= rho_max (0.3)"),
    ("search.margin.momentum=2", "search.margin.momentum=2 is invalid: expected a number in [0, 1]"),
    # tune
    ("tune.cpus_per_trial=0", "tune.cpus_per_trial=0 is invalid: expected a number > 0"),
    ("tune.max_concurrent=0", "tune.max_concurrent=0 is invalid: expected a whole number >= 1"),
    ("tune.scheduler.name=hyperband", "tune.scheduler.name='hyperband' is invalid: choose one of asha, fifo"),
    ("tune.scheduler.reduction_factor=1", "tune.scheduler.reduction_factor=1 is invalid: expected a number > 1"),
    ("tune.top_k=0", "tune.top_k=0 is invalid: expected a whole number >= 1"),
    # tracking, launcher, dist
    ("tracking.enabled=yes", "tracking.enabled='yes' is invalid: expected true or false"),
    ("tracking.tags=sweep", "tracking.tags='sweep' is invalid: expected a list of strings"),
    ("launcher.name=k8s", "launcher.name='k8s' is invalid: choose one of local, slurm, ray"),
    ("dist.zero_stage=4", "dist.zero_stage=4 is invalid: choose one of 0, 1, 2, 3"),
    ("dist.precision=fp8", "dist.precision='fp8' is invalid: choose one of auto, fp32, bf16, fp16"),
    ("dist.backend=mpi", "dist.backend='mpi' is invalid: choose one of auto, gloo, nccl"),
    ("dist.gradient_accumulation=0", "dist.gradient_accumulation=0 is invalid: expected a whole number >= 1"),
    # keys that are not in the schema, or missing from the config
    ("+train.optim.lrr=0.1", "train.optim.lrr=0.1 is not a config key (a typo?); train.optim has: betas, lr, "),
    ("+searchh=1", "searchh=1 is not a config key (a typo?); the config has: "),
    ("~search.repair", "search.repair is missing from the config"),
])
def test_a_bad_value_is_one_line_naming_the_full_key(override, message):
    with pytest.raises(MPQError) as err:
        validate_config(compose_config("pretrain", [override]))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_launcher_ray_keys_are_checked_under_their_own_schema():
    validate_config(compose_config("finetune", ["launcher=ray", "dist.nproc=2", "launcher.workers_per_node=1"]))
    validate_config(compose_config("pipeline", ["launcher=ray", "dist.nproc=2"]))  # the pipeline's training stages
    with pytest.raises(MPQError, match=r"^launcher\.placement_strategy='RANDOM' is invalid: choose one of PACK, SPREAD"):
        validate_config(compose_config("finetune", ["launcher=ray", "launcher.placement_strategy=RANDOM"]))
    with pytest.raises(MPQError, match=r"^launcher\.max_failures=-1 is invalid"):
        validate_config(compose_config("finetune", ["launcher=ray", "launcher.max_failures=-1"]))
    with pytest.raises(MPQError, match=r"dist\.nproc=2 applies to pretrain and finetune"):
        validate_config(compose_config("pipeline", ["dist.nproc=2"]))  # the local launcher's pipeline is one process


def test_launcher_slurm_keys_are_checked_under_their_own_schema():
    validate_config(compose_config("pretrain", ["launcher=slurm"]))
    with pytest.raises(MPQError, match=r"^launcher\.nodes=0 is invalid: expected a whole number >= 1$"):
        validate_config(compose_config("pretrain", ["launcher=slurm", "launcher.nodes=0"]))
    with pytest.raises(MPQError, match=r"^launcher\.partitionn='a' is not a config key .*; launcher has: cpus_per_task"):
        validate_config(compose_config("pretrain", ["launcher=slurm", "+launcher.partitionn=a"]))


def test_dist_nproc_is_for_the_training_stages_only():
    validate_config(compose_config("finetune", ["dist.nproc=2"]))
    with pytest.raises(MPQError, match="^dist.nproc=2 applies to pretrain and finetune; search runs on one process"):
        validate_config(compose_config("search", ["dist.nproc=2"]))


def test_zero_stage_3_is_refused_where_the_engine_would_refuse_it():
    validate_config(compose_config("search", ["dist.zero_stage=3"]))  # the search does not use the engine
    with pytest.raises(MPQError, match="dist.zero_stage=3 partitions the parameters, but the quantizers"):
        validate_config(compose_config("pretrain", ["dist.zero_stage=3"]))
    with pytest.raises(MPQError, match="dist.zero_stage=3 partitions the parameters, but the two-pass"):
        validate_config(compose_config("finetune", ["dist.zero_stage=3", "finetune=saq"]))


def test_the_hinge_penalty_needs_a_bitops_budget():
    validate_config(compose_config("search", ["search.budget_uniform_bits=null", "search.budget_bitops=1e9"]))
    validate_config(compose_config("search", ["search.budget_uniform_bits=null", "search.complexity.penalty=linear"]))
    for size_or_not in ([], ["search.budget_size_mb=0.05"]):
        with pytest.raises(MPQError, match=r"^search.complexity.penalty=hinge needs a BitOps budget"):
            validate_config(compose_config("search", ["search.budget_uniform_bits=null", *size_or_not]))


def test_budgets_of_fractional_bits_and_of_size_are_valid():
    validate_config(compose_config("search", ["search.budget_uniform_bits=2.5", "search.budget_size_mb=0.05"]))
    validate_config(compose_config("search", ["search.budget_uniform_bits=null", "search.budget_size_mb=0.05",
                                              "search.complexity.penalty=linear", "search.budget_fill=0"]))


def test_allowed_values_come_from_the_registries(monkeypatch):
    from framework.models import MODELS, available_models

    available_models()  # the built-in models registered first
    monkeypatch.setitem(MODELS, "tiny_net", lambda num_classes, in_channels: None)
    validate_config(compose_config("pretrain", ["model.name=tiny_net"]))


def test_a_sweep_trial_config_has_no_tune_or_launcher_and_is_valid():
    cfg = compose_config("search", ["~tune", "~launcher"])
    validate_config(cfg)


def test_an_unresolvable_interpolation_is_one_line():
    with pytest.raises(MPQError, match=r"^proxy.input_size cannot be resolved: "):
        validate_config(compose_config("pretrain", ["proxy.input_size=${data.nothing}"]))


# -- the config files build on each other ----------------------------------------------------------

@pytest.mark.parametrize("method", [p.stem for p in sorted((CONF_DIR / "search").glob("*.yaml"))])
def test_search_quant_is_the_minmax_group(method):
    assert _container(f"search={method}")["search"]["quant"] == _container("quant=minmax")["quant"]


def test_minmax_is_lsq_with_other_quantizers():
    lsq, minmax = _container("quant=lsq")["quant"], _container("quant=minmax")["quant"]
    assert {k: v for k, v in minmax.items() if lsq[k] != v} == {
        "name": "minmax", "weight": "minmax", "activation": "learned_range"}


@pytest.mark.parametrize("method,changes", [
    ("dnas", {}),
    ("seam", {"method": "seam", "margin": {"weight": 0.5}}),
    ("asga", {"method": "asga", "sharpness": {"name": "asga"}}),
    ("seam_asga", {"method": "seam_asga", "margin": {"weight": 0.5}, "sharpness": {"name": "asga"}}),
])
def test_the_methods_change_only_their_own_keys_of_dnas(method, changes):
    dnas = _container("search=dnas")["search"]
    assert _container(f"search={method}")["search"] == OmegaConf.to_container(OmegaConf.merge(dnas, changes))


#: the values that told the option files apart before they shared a base (main @ 9ffa20c)
PROXIES = {
    "mnist": {"root": None, "fraction": 0.1, "mode": "raw", "max_resolution": None},
    "fashion_mnist": {"root": "FOLLOWS data.root", "fraction": 0.04, "mode": "raw", "max_resolution": None},
    "imagefolder": {"root": None, "fraction": 0.04, "mode": "jpg", "max_resolution": 512},
}
DATASETS = {
    "mnist": {"input_size": 28, "channels": 1, "num_workers": 0, "mode": "raw", "max_resolution": None},
    "fashion_mnist": {"input_size": 28, "channels": 1, "num_workers": 0, "mode": "raw", "max_resolution": None},
    "imagefolder": {"input_size": 224, "channels": 3, "num_workers": 2, "mode": "jpg", "max_resolution": 512},
}


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_every_proxy_follows_the_targets_geometry_and_loader_and_keeps_its_own_subset(name):
    cfg = _container(f"proxy={name}", "data=imagefolder", "data.root=/t", "data.loader=ffcv", "data.ffcv.dir=/b",
                     "data.ffcv.order=quasi_random", "data.ffcv.os_cache=false", "data.ffcv.batches_ahead=5", "data.ffcv.decoder=stock",
                     "data.ffcv.write.workers=7", "seed=3")
    proxy, data, want = cfg["proxy"], cfg["data"], PROXIES[name]
    assert proxy["name"] == name and proxy["fraction"] == want["fraction"]
    assert proxy["root"] == ("/t" if want["root"] else None)
    assert (proxy["input_size"], proxy["channels"], proxy["loader"], proxy["num_workers"]) == (224, 3, "ffcv", 2)
    assert proxy["ffcv"] == {"dir": "/b", "order": "quasi_random", "os_cache": False, "batches_ahead": 5, "decoder": "stock", "write": {
        "mode": want["mode"], "max_resolution": want["max_resolution"], "jpeg_quality": 90, "compress_probability": 0.5,
        "workers": 7}}
    assert (proxy["per_class"], proxy["test_fraction"], proxy["seed"], proxy["augment"]) == (None, 1.0, 3, True)
    assert set(proxy) == set(data)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_keeps_its_values_over_the_shared_base(name):
    data, want = _container(f"data={name}")["data"], DATASETS[name]
    assert (data["name"], data["input_size"], data["channels"], data["num_workers"]) == (
        name, want["input_size"], want["channels"], want["num_workers"])
    assert (data["root"], data["fraction"], data["per_class"], data["test_fraction"], data["augment"], data["loader"]) == (
        None, 1.0, None, 1.0, True, "torch")
    assert data["ffcv"] == {"dir": None, "order": "random", "os_cache": True, "batches_ahead": 3, "decoder": "area", "write": {
        "mode": want["mode"], "max_resolution": want["max_resolution"], "jpeg_quality": 90, "compress_probability": 0.5,
        "workers": None}}


def test_shared_bases_are_not_offered_as_choices():
    from launchers.cli import check_group_choices

    assert "unknown proxy '_base'" in check_group_choices(["proxy=_base"])
    assert check_group_choices(["proxy=mnist", "data=imagefolder"]) is None


def test_hydra_flags_and_overrides_are_separated_in_any_order():
    from launchers.cli import split_hydra_args

    assert split_hydra_args(["a=1", "--cfg", "job", "b=2", "--multirun", "c=3,4"]) == (
        ["--cfg", "job", "--multirun"], ["a=1", "b=2", "c=3,4"])
    assert split_hydra_args(["--info", "defaults", "x=1", "-m"]) == (["--info", "defaults", "-m"], ["x=1"])
    assert split_hydra_args(["~key", "+new=1", "--resolve"]) == (["--resolve"], ["~key", "+new=1"])
