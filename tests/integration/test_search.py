"""The proxy search and fine-tuning on a tiny setting: ResNet-8, a few hundred proxy images, few steps."""

import pytest
import torch

from framework.models import create_model
from framework.policy import read_policy, validate_policy
from framework.quant import trace_layers
from framework.results import read_result
from framework.search.loop import run_search
from framework.stages.finetune import run_finetune
from framework.stages.pretrain import run_pretrain
from tests.conftest import compose_config, make_image_tree

TINY_SEARCH = [
    "proxy.per_class=20",        # 200 MNIST images
    "proxy.test_fraction=0.05",
    "proxy.val_fraction=0.01",   # 600 held-out images for the proxy top-1
    "search.batch_size=50",
    "search.lr_logits=0.2",      # logits move visibly within a few steps
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp")
    cfg = compose_config("pretrain", ["data.fraction=0.05", "data.test_fraction=0.05", "data.val_fraction=0.01", "train.max_steps=15",
                                      "tracking.enabled=false", f"run_dir={run_dir}"])
    return run_pretrain(cfg).artifacts["checkpoint"]


def _search(tmp_path, fp_checkpoint, *overrides):
    cfg = compose_config("search", [*TINY_SEARCH, f"init_checkpoint={fp_checkpoint}", f"run_dir={tmp_path}", *overrides])
    return run_search(cfg)


@pytest.mark.parametrize("method", ["dnas", "seam", "asga", "seam_asga"])
def test_every_method_gives_a_valid_non_uniform_policy_under_budget(tmp_path, fp_checkpoint, method):
    result = _search(tmp_path, fp_checkpoint, f"search={method}", "search.max_steps=8", "search.budget_uniform_bits=4")
    assert read_result(tmp_path)["status"] == "ok"
    policy = read_policy(result.artifacts["policy"])
    model = create_model("resnet8", num_classes=10, in_channels=1)
    validate_policy(policy, "resnet8", trace_layers(model, 28, 1))
    searched = {(layer.w_bits, layer.a_bits) for layer in policy.layers.values() if not layer.fixed}
    assert len(searched) > 1, f"{method} gave a uniform policy {searched}"
    assert policy.cost["target"].bitops <= policy.budget.bitops
    assert policy.provenance["method"] == method
    assert policy.provenance["proxy"]["dataset"] == "mnist" and len(policy.provenance["proxy"]["indices_hash"]) == 16
    assert (tmp_path / "policy.png").exists() and (tmp_path / "bit_probabilities.png").exists()
    if "asga" in method:  # the adaptive radius moved from its start, rho0 = 0.05, within its clip
        assert result.metrics["rho"] != pytest.approx(0.05) and 0.01 <= result.metrics["rho"] <= 0.3, result.metrics["rho"]
    if "seam" in method:
        assert "margin" in result.extra["history"][-1]
    # how decisive it ended, from the policy's own final probabilities
    decided = result.extra["decisiveness"]
    assert result.metrics["entropy"] == pytest.approx(decided["entropy"]) and 0.0 <= decided["entropy"] <= 1.0
    assert result.metrics["undecided"] == (decided["entropy"] > 0.8)
    assert result.metrics["fit_changed_layers"] == len(decided["fit_changed"])
    assert result.metrics["repair_applied"] == bool(decided["fit_changed"])


def test_a_tight_budget_is_met_by_the_policy(tmp_path, fp_checkpoint):
    result = _search(tmp_path, fp_checkpoint, "search=dnas", "search.max_steps=4", "search.budget_uniform_bits=2",
                     "search.complexity.weight=0.0")  # no pressure: the fit alone must enforce the budget
    policy = read_policy(result.artifacts["policy"])
    assert policy.cost["target"].bitops <= policy.budget.bitops
    assert result.metrics["gbitops"] <= result.metrics["budget_gbitops"] + 1e-12
    assert policy.repair["applied"] is True and result.metrics["repair_applied"] is True
    assert policy.repair["method"] == "milp" and policy.repair["bitops_before"] > policy.budget.bitops
    # uniform 2/2 is the cheapest policy of the candidates {2, 3, 4, 6}: the only one within the budget
    assert {(layer.w_bits, layer.a_bits) for layer in policy.layers.values() if not layer.fixed} == {(2, 2)}


def test_the_fitted_policy_uses_a_fractional_and_a_size_budget(tmp_path, fp_checkpoint):
    result = _search(tmp_path, fp_checkpoint, "search=dnas", "search.max_steps=4", "search.budget_uniform_bits=2.5",
                     "search.budget_size_mb=0.03", "search.complexity.weight=0.0")
    policy = read_policy(result.artifacts["policy"])
    target = policy.cost["target"]
    assert 0.97 * policy.budget.bitops <= target.bitops <= policy.budget.bitops and target.size_mb <= 0.03
    assert policy.budget.size_mb == 0.03 and result.metrics["budget_size_mb"] == 0.03
    assert policy.repair["fill_held"] is True and policy.repair["objective"] <= 0


def test_a_larger_complexity_weight_lowers_the_expected_bitops(tmp_path, fp_checkpoint):
    common = ["search=dnas", "search.max_steps=10", "search.complexity.penalty=linear", "search.budget_uniform_bits=null"]
    low = _search(tmp_path / "low", fp_checkpoint, *common, "search.complexity.weight=0.0")
    high = _search(tmp_path / "high", fp_checkpoint, *common, "search.complexity.weight=20.0")
    assert high.metrics["expected_gbitops"] < low.metrics["expected_gbitops"]


@pytest.mark.slow  # a search and two fine-tunings (SGD, SAQ) with their evaluations: `make test-all`; the fast
# tier fine-tunes a searched policy in the pipeline smoke run (tests/e2e/test_cli.py)
def test_finetune_under_the_searched_policy(tmp_path, fp_checkpoint):
    found = _search(tmp_path / "search", fp_checkpoint, "search=asga", "search.max_steps=4")
    for name, overrides in (("sgd", []), ("saq", ["finetune=saq"])):
        cfg = compose_config("finetune", [
            f"init_checkpoint={fp_checkpoint}", f"policy={found.artifacts['policy']}", "finetune.max_steps=4",
            "data.fraction=0.02", "data.test_fraction=0.05", "tracking.enabled=false", f"run_dir={tmp_path / name}", *overrides,
        ])
        result = run_finetune(cfg)
        assert result.metrics["bitops"] == pytest.approx(read_policy(found.artifacts["policy"]).cost["target"].bitops)
        assert result.metrics["steps"] == 4
        # 0.25-0.32 on the 500 test images (seeds 0, 1; from a checkpoint at 0.32-0.37); chance is 0.1
        assert result.metrics["top1"] > 0.15, (name, result.metrics)
        state = torch.load(f"{result.artifacts['checkpoint']}/training.pt", weights_only=True)
        assert state["two_pass"]["step_count"] == 4


def test_expected_bitops_count_fixed_layers_at_32_bits_and_macs_at_the_target_resolution(tmp_path, fp_checkpoint):
    """C = sum_l MACs_l E[b_w] E[b_a] with the full-precision first and last layers at 32 x 32 bits,
    and MACs at the target's 28 pixels while the proxy is fed at 32."""
    result = _search(tmp_path, fp_checkpoint, "search=dnas", "search.max_steps=2", "search.quant.fixed_bits=32",
                     "search.budget_uniform_bits=null", "search.complexity.penalty=linear", "proxy.input_size=32")
    policy = read_policy(result.artifacts["policy"])
    assert (policy.layers["conv1"].w_bits, policy.layers["conv1"].a_bits) == (32, 32) and policy.layers["conv1"].fixed
    assert (policy.layers["fc"].w_bits, policy.layers["fc"].a_bits) == (32, 32)
    target = {layer.name: layer.macs for layer in trace_layers(create_model("resnet8", num_classes=10, in_channels=1), 28, 1)}
    assert {name: layer.macs for name, layer in policy.layers.items()} == target
    assert policy.cost["proxy"].input_size == 32 and policy.cost["proxy"].macs > policy.cost["target"].macs
    def mean_bits(probabilities):  # E[b] over the candidates 2, 3, 4, 6
        return sum(p * b for p, b in zip(probabilities, [2, 3, 4, 6], strict=True))

    expected = 32 * 32 * (target["conv1"] + target["fc"])
    for name, p in policy.provenance["probabilities"].items():  # the searched layers' final bit probabilities
        expected += target[name] * mean_bits(p["w"]) * mean_bits(p["a"])
    assert result.metrics["expected_gbitops"] * 1e9 == pytest.approx(expected, rel=1e-5)


def test_a_proxy_with_other_classes_keeps_the_target_costs(tmp_path, fp_checkpoint):
    """A 3-class proxy (an ImageFolder tree) for the 10-class target: the policy's costs are the target's."""
    from framework.policy import cost_at
    from framework.quant import float_parameter_count

    make_image_tree(tmp_path / "tree", classes=3, per_class=6, size=(28, 28), suffix=".png")
    result = _search(tmp_path / "run", fp_checkpoint, "search=dnas", "search.max_steps=2", "proxy=imagefolder",
                     f"proxy.root={tmp_path / 'tree'}", "proxy.fraction=1.0", "search.batch_size=6")
    policy = read_policy(result.artifacts["policy"])
    target = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(target, 28, 1)
    assert policy.layers["fc"].macs == 64 * 10
    validate_policy(policy, "resnet8", layers,
                    recompute=lambda s, c: cost_at(trace_layers(target, s, c), policy.bits(), float_parameter_count(target), s, c))
    assert policy.cost["target"].size_mb == pytest.approx(
        cost_at(layers, policy.bits(), float_parameter_count(target), 28, 1).size_mb)


def test_warmup_freezes_the_logits_then_the_dual_multiplier_holds_the_budget(tmp_path, fp_checkpoint):
    """Search v2's mechanics: during search.warmup_steps only the weights move (the bit probabilities
    stay uniform); with complexity.mode=dual the multiplier rises while the expected BitOps exceed the
    budget and never goes below 0; the Gumbel temperature anneals from tau_0 to tau_final."""
    common = ["search=dnas", "search.budget_uniform_bits=2.5", "search.quant.gumbel_tau=5.0",
              "search.gumbel_tau_final=0.5", "search.complexity.mode=dual", "search.complexity.dual_lr=5.0"]
    warm = _search(tmp_path / "warm", fp_checkpoint, *common, "search.max_steps=3", "search.warmup_steps=3")
    probs = read_policy(warm.artifacts["policy"]).provenance["probabilities"]
    for dist in probs.values():  # three warm-up steps of three: the logits never moved from uniform
        assert dist["w"] == pytest.approx([0.25] * 4) and dist["a"] == pytest.approx([0.25] * 4)
    assert warm.extra["decisiveness"]["entropy"] == pytest.approx(1.0)
    assert warm.extra["history"][-1]["lambda"] == 0.0  # no ascent while warming up

    searched = _search(tmp_path / "dual", fp_checkpoint, *common, "search.max_steps=6", "search.warmup_steps=2")
    last = searched.extra["history"][-1]
    assert last["gumbel_tau"] == pytest.approx(0.5)  # annealed to tau_final at the last logit step
    budget = searched.metrics["budget_gbitops"]
    # the supernet starts at uniform probabilities over {2, 3, 4, 6}: E[BitOps] far above a 2.5-bit budget,
    # so every logit step's violation is positive and the multiplier only grows
    assert last["expected_gbitops"] > budget and last["lambda"] > 0.0
    probs = read_policy(searched.artifacts["policy"]).provenance["probabilities"]
    assert any(dist["w"] != pytest.approx([0.25] * 4) for dist in probs.values())  # the logits moved after the warm-up


def test_a_proxy_with_the_targets_labels_keeps_its_classifier(tmp_path, fp_checkpoint):
    """search.head=auto keeps the pretrained classifier when the proxy is a subset of the target (same
    dataset, same classes): the supernet starts on a solved task, where a fresh head starts at chance.
    head=fresh is the behaviour before search v2."""
    common = ["search=dnas", "search.max_steps=2", "proxy=fashion_mnist", "search.warmup_steps=2"]
    kept = _search(tmp_path / "kept", fp_checkpoint, *common)
    fresh = _search(tmp_path / "fresh", fp_checkpoint, *common, "search.head=fresh")
    other = _search(tmp_path / "mnist", fp_checkpoint, "search=dnas", "search.max_steps=2")
    assert kept.extra["head"] == "kept" and fresh.extra["head"] == "fresh" and other.extra["head"] == "fresh"
    from framework.train.checkpoint import load_checkpoint

    start = load_checkpoint(fp_checkpoint).model_state["fc.weight"]

    def head_after(result):  # the supernet's classifier weight after the two warm-up steps
        state = load_checkpoint(result.artifacts["checkpoint"]).model_state
        (weight,) = [v for k, v in state.items() if k.startswith("fc.") and k.endswith("weight") and v.shape == start.shape]
        return weight

    assert (head_after(kept) - start).norm() < 0.1 * start.norm()  # two small steps from the pretrained head
    assert (head_after(fresh) - start).norm() > 0.5 * start.norm()  # a new, unrelated initialisation
