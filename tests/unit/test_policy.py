"""The policy file: round trip, validation against a model, derivation, repair and baselines."""

import json

import pytest
import torch

from framework.errors import MPQError
from framework.models import create_model
from framework.policy import (
    Budget,
    cost_at,
    derive_bits,
    make_policy,
    random_bits,
    read_policy,
    repair,
    uniform_bits,
    validate_policy,
    write_policy,
)
from framework.quant import (
    SearchConv2d,
    build_supernet,
    fixed_layer_names,
    float_parameter_count,
    trace_layers,
)

MODEL = create_model("resnet8", num_classes=10, in_channels=1)
LAYERS = trace_layers(MODEL, 28, 1)
TOTAL = float_parameter_count(MODEL)
FIXED = fixed_layer_names(LAYERS, 8)


def _policy(bits, budget=None):
    return make_policy(
        "resnet8", LAYERS, bits, FIXED, {"target": cost_at(LAYERS, bits, TOTAL, 28, 1)}, budget=budget,
        provenance={"method": "test", "proxy": {"dataset": "mnist", "fraction": 0.1, "seed": 0, "indices_hash": "abc"}},
    )


def test_round_trip_writes_json_and_plot(tmp_path):
    bits = random_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, None, seed=0)
    policy = _policy(bits)
    written = write_policy(policy, tmp_path / "policy.json")
    assert (tmp_path / "policy.png").stat().st_size > 1000
    again = read_policy(written["policy"])
    assert again == policy
    raw = json.loads((tmp_path / "policy.json").read_text())
    assert raw["schema"] == "mpq-policy/1" and raw["model"] == "resnet8"
    assert raw["layers"]["conv1"] == {"w_bits": 8, "a_bits": 8, "macs": LAYERS[0].macs, "params": 144, "fixed": True}
    assert raw["provenance"]["proxy"]["indices_hash"] == "abc" and "code_version" in raw["provenance"]


def _bad(tmp_path, mutate):
    data = json.loads(_policy(uniform_bits(LAYERS, 4, 4, FIXED, 8)).to_json())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return read_policy(path)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["layers"].update({"layer9.conv": d["layers"]["conv1"]}), "unknown layer 'layer9.conv'"),
        (lambda d: d["layers"].pop("layer2.0.conv2"), "missing layer 'layer2.0.conv2'"),
        (lambda d: d["layers"]["layer1.0.conv1"].update(w_bits=9), "layer 'layer1.0.conv1' has w_bits=9"),
        (lambda d: d.update(model="resnet20"), "for model 'resnet20'"),
        (lambda d: d.update(budget={"bitops": 1e6, "at": "target"}), "breaks its budget"),
    ],
)
def test_validation_names_the_problem(tmp_path, mutate, message):
    policy = _bad(tmp_path, mutate)
    with pytest.raises(MPQError, match=message):
        validate_policy(policy, "resnet8", LAYERS, "policy")


def test_budget_is_checked_on_measured_cost_not_the_written_one(tmp_path):
    def lie(d):
        d["budget"] = {"bitops": 1e6, "at": "target"}
        d["cost"]["target"]["bitops"] = 1.0

    policy = _bad(tmp_path, lie)
    validate_policy(policy, "resnet8", LAYERS)  # the file's own numbers hold...
    with pytest.raises(MPQError, match="breaks its budget"):  # ...the measured ones do not
        validate_policy(policy, "resnet8", LAYERS, recompute=lambda s, c: cost_at(LAYERS, policy.bits(), TOTAL, s, c))


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "mpq-policy/2", "model": "resnet8", "layers": {}}', "schema"),
        ('{"schema": "mpq-policy/1", "model": "resnet8", "layers": {"conv1": {"w_bits": "four", "a_bits": 8, "macs": 1, "params": 1}}}', "layers.conv1.w_bits"),
        ('[1, 2]', "not a JSON object"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(MPQError, match=message):
        read_policy(path)


def test_random_policies_are_seeded_and_meet_the_budget():
    budget = cost_at(LAYERS, uniform_bits(LAYERS, 3, 3, FIXED, 8), TOTAL, 28, 1).bitops
    a = random_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, budget, seed=1)
    b = random_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, budget, seed=1)
    c = random_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, budget, seed=2)
    assert a == b and a != c
    for bits in (a, c):
        assert cost_at(LAYERS, bits, TOTAL, 28, 1).bitops <= budget
        assert bits["conv1"] == (8, 8) and bits["fc"] == (8, 8)
        assert len({v for name, v in bits.items() if name not in FIXED}) > 1  # mixed, not uniform
    with pytest.raises(MPQError, match="impossible"):
        random_bits(LAYERS, [2, 4], [2, 4], FIXED, 8, budget_bitops=1000.0, seed=0)


def _supernet():
    from tests.conftest import compose_config

    model = create_model("resnet8", num_classes=10, in_channels=1)
    build_supernet(model, trace_layers(model, 28, 1), compose_config("pretrain", ["quant=minmax"]).quant)
    return model


def test_derive_is_the_argmax_of_the_logits():
    model = _supernet()
    with torch.no_grad():
        model.layer1[0].conv1.alpha_w.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0]))  # 4 bits
        model.layer1[0].conv1.alpha_a.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))  # 6 bits
    bits, probs = derive_bits(model)
    assert bits["layer1.0.conv1"] == (4, 6)
    assert bits["conv1"] == (8, 8) and set(bits) == {layer.name for layer in LAYERS}
    assert probs["layer1.0.conv1"]["w"][2] == pytest.approx(max(probs["layer1.0.conv1"]["w"]))


def test_repair_meets_the_budget_dropping_the_least_probable_mass():
    model = _supernet()
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, SearchConv2d):
            with torch.no_grad():
                module.alpha_w.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]) + 0.1 * torch.randn(4))
                module.alpha_a.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]) + 0.1 * torch.randn(4))
    bits, probs = derive_bits(model)
    candidates = {n: (m.w_candidates, m.a_candidates) for n, m in model.named_modules() if isinstance(m, SearchConv2d)}
    before = cost_at(LAYERS, bits, TOTAL, 28, 1).bitops
    budget = 0.6 * before
    fixed_bits, record = repair(LAYERS, bits, probs, candidates, budget)
    assert record["applied"] and record["bitops_after"] <= budget < record["bitops_before"] == before
    assert cost_at(LAYERS, fixed_bits, TOTAL, 28, 1).bitops <= budget
    untouched, record2 = repair(LAYERS, bits, probs, candidates, 2 * before)
    assert untouched == bits and record2["applied"] is False
    with pytest.raises(MPQError, match="impossible"):
        repair(LAYERS, bits, probs, candidates, 1000.0)


def test_budget_model_accepts_only_known_resolutions():
    with pytest.raises(ValueError):
        Budget(bitops=1e9, at="somewhere")
