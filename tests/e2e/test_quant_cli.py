"""`mpq cost`, `mpq evaluate` and `mpq finetune` with policies: the round trip, the cost and top-1
under a policy, and a bad policy file once per command for the one-line error contract (every kind
of bad policy is checked in-process in tests/unit/test_policy.py). `mpq cost` of ResNet-18 runs in a
subprocess (the cost stage's smoke run); the others call the command's `main` in-process."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.policy import cost_at, make_policy
from framework.quant import fixed_layer_names, float_parameter_count, trace_layers
from framework.stage import quant_meta, quantize_with_policy
from framework.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from framework.train.loop import evaluate
from tests.conftest import (
    assert_one_error_line,
    read_json,
    read_result,
    run_mpq,
    run_mpq_in_process,
    run_stage_in_process,
)


@pytest.fixture(scope="module")
def resnet18_cost(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cost")
    proc = run_mpq("cost", "model=resnet18", "input_size=224", "in_channels=3", "policy=uniform:8/8",
                   f"hydra.run.dir={run_dir}", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, proc


@pytest.mark.smoke
def test_cost_command_matches_published_resnet18(resnet18_cost):
    run_dir, proc = resnet18_cost
    result = read_result(run_dir)
    assert result["status"] == "ok"
    assert result["metrics"]["macs"] / 1e9 == pytest.approx(1.82, rel=0.01)
    assert result["metrics"]["bitops"] / 1e9 == pytest.approx(116.0, rel=0.01)
    # every conv and linear weight at 8 bits (1 byte), batch norm and biases at 32 bits (4 bytes)
    model = create_model("resnet18", num_classes=1000, in_channels=3)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    others = sum(p.numel() for p in model.parameters()) - weights
    assert weights + others == 11_689_512  # torchvision's published parameter count
    assert result["metrics"]["size_mb"] == pytest.approx((weights * 1 + others * 4) / 1e6)
    assert "layer4.1.conv2" in proc.stdout and "total:" in proc.stdout
    assert (run_dir / "policy.json").exists() and (run_dir / "policy.png").exists()


def test_policy_round_trips_through_the_command(resnet18_cost, tmp_path):
    run_dir, _ = resnet18_cost
    data = read_json(run_dir / "policy.json")
    data["layers"]["layer3.0.conv1"].update(w_bits=2, a_bits=4)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(data))
    result = run_stage_in_process("cost", tmp_path / "r", "model=resnet18", "input_size=224", f"policy={mixed}", "tracking.enabled=false")
    layer = data["layers"]["layer3.0.conv1"]
    expected = read_result(run_dir)["metrics"]["bitops"] - layer["macs"] * (64 - 8)
    assert result["metrics"]["bitops"] == pytest.approx(expected)
    again = read_json(tmp_path / "r" / "policy.json")
    assert again["layers"] == data["layers"]


@pytest.fixture(scope="module")
def resnet8_policy(tmp_path_factory):
    """A uniform 4/4 resnet8 policy written by `mpq cost` at the Fashion-MNIST geometry."""
    run_dir = tmp_path_factory.mktemp("r8cost")
    run_stage_in_process("cost", run_dir, "model=resnet8", "input_size=28", "in_channels=1", "policy=uniform:4/4", "tracking.enabled=false")
    return run_dir


def _bad_policy_file(tmp_path, resnet8_policy, change):
    data = read_json(resnet8_policy / "policy.json")
    change(data)
    path = tmp_path / "bad_policy.json"
    path.write_text(json.dumps(data))
    return path


def test_a_bad_policy_through_cost_is_one_error_line(resnet8_policy, tmp_path):
    path = _bad_policy_file(tmp_path, resnet8_policy, lambda d: d.update(budget={"bitops": 1e6, "at": "target"}))
    proc = run_mpq_in_process("cost", "model=resnet8", "input_size=28", "in_channels=1", f"policy={path}",
                   f"hydra.run.dir={tmp_path / 'r'}", "tracking.enabled=false")
    assert_one_error_line(proc, "cost", f"policy file {path} breaks its budget", run_dir=tmp_path / "r")


def test_baseline_policies_through_cost_meet_the_search_budget(tmp_path):
    """`policy=uniform-budget` under a fractional `search.budget_uniform_bits` and `policy=random:<seed>`
    under the default budget resolve through `mpq cost`; an impossible budget is one error line."""
    common = ["model=resnet8", "input_size=28", "in_channels=1", "tracking.enabled=false"]
    uniform = run_stage_in_process("cost", tmp_path / "u", *common, "policy=uniform-budget", "search.budget_uniform_bits=2.5")
    policy = read_json(tmp_path / "u" / "policy.json")
    # 2.5 bits: 2.5 x 2.5 BitOps per MAC in every searched layer, the fixed layers at 8 x 8
    expected = sum(layer["macs"] * (64 if layer["fixed"] else 6.25) for layer in policy["layers"].values())
    assert policy["budget"]["bitops"] == pytest.approx(expected)
    assert uniform["metrics"]["bitops"] <= policy["budget"]["bitops"]
    assert len({(layer["w_bits"], layer["a_bits"]) for layer in policy["layers"].values() if not layer["fixed"]}) == 1
    assert policy["provenance"]["method"] == "uniform-budget"

    random = run_stage_in_process("cost", tmp_path / "r", *common, "policy=random:3")
    policy = read_json(tmp_path / "r" / "policy.json")
    budget = policy["budget"]["bitops"]
    assert 0.97 * budget <= random["metrics"]["bitops"] <= budget  # the default budget, uniform 4/4, used
    assert policy["provenance"]["method"] == "random" and policy["provenance"]["seed"] == 3

    proc = run_mpq_in_process("cost", *common, "policy=random:3", "search.budget_bitops=1", f"hydra.run.dir={tmp_path / 'x'}")
    assert_one_error_line(proc, "cost", "BitOps budget", "is impossible", "raise search.budget_bitops", run_dir=tmp_path / "x")


def test_a_bad_policy_through_evaluate_is_one_error_line(pretrained_checkpoint, resnet8_policy, tmp_path):
    path = _bad_policy_file(tmp_path, resnet8_policy, lambda d: d["layers"].update({"layer9.conv": d["layers"]["conv1"]}))
    proc = run_mpq_in_process("evaluate", f"checkpoint={pretrained_checkpoint}", f"policy={path}", f"hydra.run.dir={tmp_path / 'r'}",
                   "tracking.enabled=false", "data.test_fraction=0.1")
    assert_one_error_line(proc, "evaluate", f"policy file {path} names unknown layer 'layer9.conv'", run_dir=tmp_path / "r")


def test_a_bad_policy_through_finetune_is_one_error_line(pretrained_checkpoint, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"schema": "mpq-policy/1", "model": "resnet8", "layers": {')
    proc = run_mpq_in_process("finetune", f"init_checkpoint={pretrained_checkpoint}", f"policy={path}", f"hydra.run.dir={tmp_path / 'r'}",
                   "tracking.enabled=false", "data.fraction=0.02", "data.test_fraction=0.05")
    assert_one_error_line(proc, "finetune", f"policy file {path} is not valid JSON", run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_evaluate_under_a_policy_reports_top1_bitops_and_size(pretrained_run, pretrained_checkpoint, resnet8_policy, tmp_path):
    result = run_stage_in_process("evaluate", tmp_path, f"checkpoint={pretrained_checkpoint}", f"policy={resnet8_policy / 'policy.json'}",
                       "tracking.enabled=false")
    assert result["quantized"] is True
    cost = read_result(resnet8_policy)["metrics"]
    assert result["metrics"]["bitops"] == pytest.approx(cost["bitops"])
    assert result["metrics"]["size_mb"] == pytest.approx(cost["size_mb"])
    # post-training 4/4 bits keeps the model: 0.48 and 0.45 against 0.48 and 0.47 in full precision
    # on the same 10,000 test images (seeds 0, 1); chance is 0.1
    fp_top1 = pretrained_run["result"]["metrics"]["top1"]
    assert result["metrics"]["samples"] == 10000
    assert result["metrics"]["top1"] > 0.3 and abs(result["metrics"]["top1"] - fp_top1) < 0.1, (result["metrics"], fp_top1)
    assert (tmp_path / "policy.png").exists()


@pytest.mark.parametrize("missing", [(), ("kernels", "act_init")], ids=["whole", "written_before_kernels"])
def test_evaluate_a_quantized_checkpoint(pretrained_checkpoint, tmp_path, missing):
    """A checkpoint saved with its policy and LSQ state scores the same through `mpq evaluate`, also
    one whose quantizer config predates a key of the `quant` group."""
    from framework.data import build_dataset, build_loader
    from tests.conftest import compose_config

    qcfg = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
    source = load_checkpoint(pretrained_checkpoint)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    load_model_state(model, source)
    layers = trace_layers(model, 28, 1)
    fixed = fixed_layer_names(layers, 8)
    bits = {layer.name: ((8, 8) if layer.name in fixed else (3, 4)) for layer in layers}
    policy = make_policy("resnet8", layers, bits, fixed, {"target": cost_at(layers, bits, float_parameter_count(model), 28, 1)})
    quantize_with_policy(model, policy, qcfg, layers)
    cfg = compose_config("evaluate", ["data.test_fraction=0.1"])
    test_set = build_dataset(cfg.data, "test")
    loader = build_loader(test_set, 500, False, cfg.data)
    model.eval()
    with torch.no_grad():
        model(next(iter(loader))[0])  # initialise LSQ steps
    expected = evaluate(model, loader, torch.device("cpu"))["top1"]
    meta = quant_meta(policy, qcfg)
    for key in missing:
        del meta["config"][key]
    save_checkpoint(tmp_path / "q", model, {**source.meta, "quant": meta})

    result = run_stage_in_process("evaluate", tmp_path / "r", f"checkpoint={tmp_path / 'q'}", "data.test_fraction=0.1", "tracking.enabled=false")
    assert result["quantized"] is True
    assert result["metrics"]["top1"] == pytest.approx(expected, abs=1e-9)
    assert result["metrics"]["avg_w_bits"] == pytest.approx(3.0) and result["metrics"]["avg_a_bits"] == pytest.approx(4.0)
