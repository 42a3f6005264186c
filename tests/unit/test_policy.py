"""The policy file: round trip, validation against a model, derivation, the fit to a budget and
the baselines (`uniform:W/A`, `random:<seed>`, `uniform-budget`).

Every kind of bad policy runs here, in-process, through the function `mpq cost`, `mpq evaluate` and
`mpq finetune` resolve `policy=` with; tests/e2e/test_quant_cli.py runs one bad policy per command
for the one-line error contract."""

import functools
import json

import pytest
import torch

from framework.errors import MPQError
from framework.models import create_model
from framework.policy import (
    Budget,
    budget_from_config,
    cost_at,
    derive_bits,
    draw_bits,
    fit_to_budget,
    make_policy,
    policy_from_dict,
    read_policy,
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
from framework.stage import Geometry, resolve_policy
from tests.conftest import compose_config

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
    bits = draw_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, seed=0)
    policy = _policy(bits)
    written = write_policy(policy, tmp_path / "policy.json")
    assert (tmp_path / "policy.png").stat().st_size > 1000
    again = read_policy(written["policy"])
    assert again == policy
    raw = json.loads((tmp_path / "policy.json").read_text())
    assert raw["schema"] == "mpq-policy/1" and raw["model"] == "resnet8"
    assert raw["layers"]["conv1"] == {"w_bits": 8, "a_bits": 8, "macs": LAYERS[0].macs, "params": 144, "fixed": True}
    assert raw["provenance"]["proxy"]["indices_hash"] == "abc" and "code_version" in raw["provenance"]


def _lie_about_the_cost(d):
    d["budget"] = {"bitops": 1e6, "at": "target"}
    d["cost"]["target"]["bitops"] = 1.0


SUPPORTED = "use one of [2, 3, 4, 5, 6, 7, 8, 32]"

# name: (a change to a valid resnet8 policy file, or the file's text, or a `uniform:` spec;
#        fragments of the one error line: the layer or key at fault, then what would fix it)
BAD_POLICIES = {
    "unknown_layer": (lambda d: d["layers"].update({"layer9.conv": d["layers"]["conv1"]}),
                      ["names unknown layer 'layer9.conv'", "remove it or fix its name"]),
    "missing_layer": (lambda d: d["layers"].pop("layer2.0.conv2"),
                      ["missing layer 'layer2.0.conv2'", "give every conv and linear layer w_bits and a_bits"]),
    "unsupported_w_bits": (lambda d: d["layers"]["layer1.0.conv1"].update(w_bits=9),
                           ["layer 'layer1.0.conv1' has w_bits=9", SUPPORTED]),
    "unsupported_a_bits": (lambda d: d["layers"]["layer1.0.conv1"].update(a_bits=1),
                           ["layer 'layer1.0.conv1' has a_bits=1", SUPPORTED]),
    "other_model": (lambda d: d.update(model="resnet20"),
                    ["is for model 'resnet20', not 'resnet8'", "pick model=resnet20"]),
    "broken_budget": (lambda d: d.update(budget={"bitops": 1e6, "at": "target"}),
                      ["breaks its budget", "budget 0.0010 GBitOps", "lower some layers' bits or raise budget.bitops"]),
    "budget_met_only_on_paper": (_lie_about_the_cost, ["breaks its budget", "lower some layers' bits or raise budget.bitops"]),
    "broken_size_budget": (lambda d: d.update(budget={"size_mb": 1e-3, "at": "target"}),
                           ["breaks its budget", "> budget 0.0010 MB", "raise budget.size_mb"]),
    "budget_without_a_limit": (lambda d: d.update(budget={"at": "target"}),
                               ["malformed", "field 'budget'", "bitops, size_mb or both"]),
    "budget_without_its_cost": (lambda d: d.update(budget={"bitops": 1e12, "at": "proxy"}),
                                ["budget at the proxy resolution", "no cost.proxy"]),
    "misspelt_key": (lambda d: d["layers"]["conv1"].update(w_bit=d["layers"]["conv1"].pop("w_bits")),
                     ["malformed", "field 'layers.conv1.w_bits'"]),
    "negative_macs": (lambda d: d["layers"]["fc"].update(macs=-1), ["malformed", "field 'layers.fc.macs'"]),
    "no_layers": (lambda d: d.update(layers={}), ["malformed", "field 'layers'", "at least one layer"]),
    "malformed_json": ("{not json", ["not valid JSON", "line 1, column 2"]),
    "other_schema": ('{"schema": "mpq-policy/2", "model": "resnet8", "layers": {}}',
                     ["has schema 'mpq-policy/2'", "expected 'mpq-policy/1'"]),
    "wrong_type": ('{"schema": "mpq-policy/1", "model": "resnet8", "layers": {"conv1": {"w_bits": "four", "a_bits": 8, '
                   '"macs": 1, "params": 1}}}', ["malformed", "field 'layers.conv1.w_bits'", "valid integer"]),
    "not_an_object": ("[1, 2]", ["not a JSON object", "a policy file has schema, model and layers"]),
    "not_text": (b"\xff\xfe\x00policy", ["not UTF-8 text", "a policy file is JSON"]),
    "no_file": (None, ["does not exist", "pass policy=<path to policy.json>, uniform:W/A, random:<seed> or uniform-budget"]),
    "uniform_without_activation_bits": ("uniform:4", ["policy=uniform:4 is malformed", "write uniform:W/A"]),
    "uniform_unsupported_bits": ("uniform:4/1", ["policy=uniform:4/1", "1 bits is not supported", SUPPORTED]),
    "random_without_a_seed": ("random:", ["policy=random: is malformed", "e.g. random:3"]),
    "random_with_a_word": ("random:three", ["policy=random:three is malformed", "whole number >= 0, e.g. random:3"]),
}

SPECS = ("uniform:", "random:")


@functools.cache
def _config(overrides: tuple[str, ...] = ()):
    """The finetune config with `overrides` (composed once; the tests only read it)."""
    return compose_config("finetune", list(overrides))


def _resolve(spec, *overrides):
    """`resolve_policy` as `mpq finetune` calls it, resnet8 at 28x28x1, the finetune config with `overrides`."""
    cfg = _config(overrides)
    return resolve_policy(spec, "resnet8", lambda: create_model("resnet8", num_classes=10, in_channels=1), Geometry(28, 1),
                          cfg.quant, search_cfg=cfg.search)


def _bad_spec(tmp_path, change) -> tuple[str, str | None]:
    """The `policy=` value of a bad case, and the file it names (None for a `uniform:` or `random:` spec)."""
    if isinstance(change, str) and change.startswith(SPECS):
        return change, None
    path = tmp_path / "policy.json"
    if callable(change):
        data = json.loads(_policy(uniform_bits(LAYERS, 4, 4, FIXED, 8)).to_json())
        change(data)
        path.write_text(json.dumps(data))
    elif isinstance(change, bytes):
        path.write_bytes(change)
    elif change is not None:
        path.write_text(change)
    return str(path), str(path)


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_a_bad_policy_is_one_error_naming_the_fault_and_the_fix(tmp_path, name):
    change, fragments = BAD_POLICIES[name]
    spec, path = _bad_spec(tmp_path, change)
    with pytest.raises(MPQError) as err:
        _resolve(spec)
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in ([f"policy file {path}"] if path else []) + fragments:
        assert fragment in message, message


def test_the_good_policy_the_bad_ones_are_made_from_resolves(tmp_path):
    spec, _ = _bad_spec(tmp_path, lambda d: None)
    policy, layers = _resolve(spec)
    assert policy.bits() == uniform_bits(LAYERS, 4, 4, FIXED, 8)
    assert [layer.name for layer in layers] == [layer.name for layer in LAYERS]


def test_budget_is_checked_on_measured_cost_not_the_written_one(tmp_path):
    policy = read_policy(_bad_spec(tmp_path, _lie_about_the_cost)[1])
    validate_policy(policy, "resnet8", LAYERS)  # the file's own numbers hold...
    with pytest.raises(MPQError, match="breaks its budget"):  # ...the measured ones do not
        validate_policy(policy, "resnet8", LAYERS, recompute=lambda s, c: cost_at(LAYERS, policy.bits(), TOTAL, s, c))


def test_old_policy_files_with_a_bitops_budget_read():
    data = json.loads(_policy(uniform_bits(LAYERS, 4, 4, FIXED, 8)).to_json())
    data["budget"] = {"bitops": 1e9, "at": "target"}  # as written before budget.size_mb existed
    policy = policy_from_dict(data)
    assert policy.budget.bitops == 1e9 and policy.budget.size_mb is None
    validate_policy(policy, "resnet8", LAYERS)


def _budget(overrides=()):
    cfg = _config(tuple(overrides))
    return budget_from_config(cfg.search, LAYERS, FIXED, 8)


def _within(policy, budget):
    cost = policy.cost["target"]
    return (budget.bitops is None or cost.bitops <= budget.bitops) and (budget.size_mb is None or cost.size_mb <= budget.size_mb)


def test_random_policies_are_seeded_and_meet_the_budget():
    """The default budget is uniform 4/4 bits: each seed's policy meets it, uses it (the fill share),
    repeats for its seed and differs between seeds."""
    a, b, c = (_resolve(spec)[0] for spec in ("random:1", "random:1", "random:2"))
    budget = _budget()
    assert a.bits() == b.bits() and a.bits() != c.bits()
    for policy in (a, c):
        assert _within(policy, budget) and policy.cost["target"].bitops >= 0.97 * budget.bitops
        assert policy.bits()["conv1"] == (8, 8) and policy.bits()["fc"] == (8, 8)
        assert len({v for name, v in policy.bits().items() if name not in FIXED}) > 1  # mixed, not uniform
        assert policy.budget.bitops == pytest.approx(budget.bitops)
        assert policy.provenance["method"] == "random" and policy.provenance["fit"]["method"] == "milp"
    assert (a.provenance["seed"], c.provenance["seed"]) == (1, 2)


def test_random_policies_meet_a_size_budget_too():
    overrides = ["search.budget_uniform_bits=2.5", "search.budget_size_mb=0.03"]
    budget = _budget(overrides)
    for seed in range(3):
        policy = _resolve(f"random:{seed}", *overrides)[0]
        assert _within(policy, budget) and policy.budget.size_mb == 0.03


def test_a_random_policy_without_a_budget_is_the_draw():
    policy = _resolve("random:7", "search.budget_uniform_bits=null", "search.complexity.penalty=linear")[0]
    assert policy.bits() == draw_bits(LAYERS, [2, 3, 4, 6], [2, 3, 4, 6], FIXED, 8, seed=7)
    assert policy.budget is None and policy.provenance["fit"] is None


def test_an_impossible_budget_is_one_error_naming_the_key():
    with pytest.raises(MPQError, match=r"is impossible: the cheapest policy .* raise search.budget_bitops"):
        _resolve("random:0", "search.budget_bitops=1")
    with pytest.raises(MPQError, match=r"no uniform W/A .* raise search.budget_uniform_bits"):
        _resolve("uniform-budget", "search.budget_bitops=1")


@pytest.mark.parametrize("overrides", [["search.budget_uniform_bits=2.5"], ["search.budget_uniform_bits=3"],
                                       ["search.budget_uniform_bits=null", "search.budget_size_mb=0.03"],
                                       ["search.budget_uniform_bits=3.3", "search.budget_size_mb=0.03"]],
                         ids=["bitops_2.5", "bitops_3", "size", "both"])
def test_uniform_budget_is_the_uniform_pair_with_the_most_bitops_within_the_budget(overrides):
    overrides = [*overrides, "search.complexity.penalty=linear"]
    policy = _resolve("uniform-budget", *overrides)[0]
    budget = _budget(overrides)
    assert _within(policy, budget) and policy.budget.bitops == budget.bitops and policy.budget.size_mb == budget.size_mb
    searched = {v for name, v in policy.bits().items() if name not in FIXED}
    assert len(searched) == 1 and policy.provenance["method"] == "uniform-budget"
    (chosen,) = searched
    chosen_bitops = policy.cost["target"].bitops
    for w in (2, 3, 4, 6):
        for a in (2, 3, 4, 6):
            other = _policy(uniform_bits(LAYERS, w, a, FIXED, 8))
            more = other.cost["target"].bitops > chosen_bitops or (other.cost["target"].bitops == chosen_bitops and w > chosen[0])
            assert not (more and _within(other, budget)), (w, a, chosen)


def test_uniform_budget_needs_a_budget():
    with pytest.raises(MPQError, match="uniform-budget needs search.budget_uniform_bits, search.budget_bitops or "
                                       "search.budget_size_mb"):
        _resolve("uniform-budget", "search.budget_uniform_bits=null", "search.complexity.penalty=linear")


def _supernet():
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


def test_the_search_fit_meets_and_fills_the_budget_and_keeps_an_argmax_within_it():
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
    budget = _budget(["search.budget_uniform_bits=3"])
    assert budget.bitops < before
    fitted, record = fit_to_budget(LAYERS, bits, probs, candidates, budget, TOTAL)
    after = cost_at(LAYERS, fitted, TOTAL, 28, 1).bitops
    assert 0.97 * budget.bitops <= after <= budget.bitops
    assert record["applied"] and record["method"] == "milp" and record["bitops_before"] == before and record["fill_held"]
    assert {name: fitted[name] for name in FIXED} == {name: bits[name] for name in FIXED}
    untouched, record2 = fit_to_budget(LAYERS, bits, probs, candidates, _budget([f"search.budget_bitops={before}"]), TOTAL)
    assert untouched == bits and record2["applied"] is False
    with pytest.raises(MPQError, match="impossible"):
        fit_to_budget(LAYERS, bits, probs, candidates, _budget(["search.budget_bitops=1000"]), TOTAL)


def test_budget_model_accepts_only_known_resolutions():
    with pytest.raises(ValueError):
        Budget(bitops=1e9, at="somewhere")
