"""`mpq cost` and `mpq evaluate` with policies, in a subprocess: round trip and every bad input."""

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
from tests.conftest import read_json, run_mpq


@pytest.fixture(scope="module")
def resnet18_cost(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cost")
    proc = run_mpq("cost", "model=resnet18", "input_size=224", "in_channels=3", "policy=uniform:8/8",
                   f"hydra.run.dir={run_dir}", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, proc


def test_cost_command_matches_published_resnet18(resnet18_cost):
    run_dir, proc = resnet18_cost
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok"
    assert result["metrics"]["macs"] / 1e9 == pytest.approx(1.82, rel=0.01)
    assert result["metrics"]["bitops"] / 1e9 == pytest.approx(116.0, rel=0.01)
    assert result["metrics"]["size_mb"] > 0
    assert "layer4.1.conv2" in proc.stdout and "total:" in proc.stdout
    assert (run_dir / "policy.json").exists() and (run_dir / "policy.png").exists()


def test_policy_round_trips_through_the_command(resnet18_cost, tmp_path):
    run_dir, _ = resnet18_cost
    data = read_json(run_dir / "policy.json")
    data["layers"]["layer3.0.conv1"].update(w_bits=2, a_bits=4)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(data))
    proc = run_mpq("cost", "model=resnet18", "input_size=224", f"policy={mixed}", f"hydra.run.dir={tmp_path / 'r'}",
                   "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    layer = data["layers"]["layer3.0.conv1"]
    expected = read_json(run_dir / "result.json")["metrics"]["bitops"] - layer["macs"] * (64 - 8)
    assert read_json(tmp_path / "r" / "result.json")["metrics"]["bitops"] == pytest.approx(expected)
    again = read_json(tmp_path / "r" / "policy.json")
    assert again["layers"] == data["layers"]


def _one_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(proc.error_lines) == 1, proc.error_lines
    for fragment in fragments:
        assert fragment in proc.error_lines[0], proc.error_lines[0]


BAD_POLICIES = {
    "unknown_layer": (lambda d: d["layers"].update({"layer9.conv": dict(d["layers"]["conv1"])}), "unknown layer 'layer9.conv'"),
    "missing_layer": (lambda d: d["layers"].pop("layer1.0.conv2"), "missing layer 'layer1.0.conv2'"),
    "unsupported_bits": (lambda d: d["layers"]["layer1.0.conv1"].update(a_bits=1), "a_bits=1"),
    "broken_budget": (lambda d: d.update(budget={"bitops": 1e6, "at": "target"}), "breaks its budget"),
    "other_model": (lambda d: d.update(model="resnet20"), "for model 'resnet20'"),
}


def _bad_policy_file(tmp_path, source_dir, name):
    data = read_json(source_dir / "policy.json")
    BAD_POLICIES[name][0](data)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_bad_policy_through_cost(resnet18_cost, tmp_path, name):
    path = _bad_policy_file(tmp_path, resnet18_cost[0], name)
    proc = run_mpq("cost", "model=resnet18", "input_size=224", f"policy={path}", f"hydra.run.dir={tmp_path / 'r'}",
                   "tracking.enabled=false")
    _one_line(proc, BAD_POLICIES[name][1], str(path))
    assert read_json(tmp_path / "r" / "result.json")["status"] == "error"


def test_malformed_json_through_cost(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"schema": "mpq-policy/1", "model": "resnet8", "layers": {')
    proc = run_mpq("cost", "model=resnet8", "input_size=28", "in_channels=1", f"policy={path}",
                   f"hydra.run.dir={tmp_path / 'r'}", "tracking.enabled=false")
    _one_line(proc, "not valid JSON", "line 1")


@pytest.fixture(scope="module")
def resnet8_policy(tmp_path_factory):
    """A uniform 4/4 resnet8 policy written by `mpq cost` at the Fashion-MNIST geometry."""
    run_dir = tmp_path_factory.mktemp("r8cost")
    proc = run_mpq("cost", "model=resnet8", "input_size=28", "in_channels=1", "policy=uniform:4/4",
                   f"hydra.run.dir={run_dir}", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("name", [*sorted(BAD_POLICIES), "malformed_json"])
def test_bad_policy_through_evaluate(pretrained_run, resnet8_policy, tmp_path, name):
    if name == "malformed_json":
        path, message = tmp_path / "policy.json", "not valid JSON"
        path.write_text('{"schema": "mpq-policy/1", "model": "resnet8", "layers": {')
    else:
        path, message = _bad_policy_file(tmp_path, resnet8_policy, name), BAD_POLICIES[name][1]
    proc = run_mpq("evaluate", f"checkpoint={pretrained_run['result']['artifacts']['checkpoint']}", f"policy={path}",
                   f"hydra.run.dir={tmp_path / 'r'}", "tracking.enabled=false", "data.test_fraction=0.1")
    _one_line(proc, message, str(path))
    assert read_json(tmp_path / "r" / "result.json")["status"] == "error"


def test_evaluate_under_a_policy_reports_top1_bitops_and_size(pretrained_run, resnet8_policy, tmp_path):
    proc = run_mpq("evaluate", f"checkpoint={pretrained_run['result']['artifacts']['checkpoint']}",
                   f"policy={resnet8_policy / 'policy.json'}", f"hydra.run.dir={tmp_path}", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "result.json")
    assert result["quantized"] is True
    cost = read_json(resnet8_policy / "result.json")["metrics"]
    assert result["metrics"]["bitops"] == pytest.approx(cost["bitops"])
    assert result["metrics"]["size_mb"] == pytest.approx(cost["size_mb"])
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    assert (tmp_path / "policy.png").exists()


def test_evaluate_a_quantized_checkpoint(pretrained_run, resnet8_policy, tmp_path):
    """A checkpoint saved with its policy and LSQ state scores the same through `mpq evaluate`."""
    from framework.data import build_dataset, build_loader
    from tests.conftest import compose_config

    qcfg = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
    source = load_checkpoint(pretrained_run["result"]["artifacts"]["checkpoint"])
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
    save_checkpoint(tmp_path / "q", model, {**source.meta, "quant": quant_meta(policy, qcfg)})

    proc = run_mpq("evaluate", f"checkpoint={tmp_path / 'q'}", "data.test_fraction=0.1", f"hydra.run.dir={tmp_path / 'r'}",
                   "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(tmp_path / "r" / "result.json")
    assert result["quantized"] is True
    assert result["metrics"]["top1"] == pytest.approx(expected, abs=1e-9)
    assert result["metrics"]["avg_w_bits"] == pytest.approx(3.0) and result["metrics"]["avg_a_bits"] == pytest.approx(4.0)
