"""Which parameters the second pass perturbs: weights, biases, batch-norm affine parameters and
learned activation ranges (PACT clips); never an LSQ step size (weights' or activations') nor the
search logits, also when a quantized layer is itself the model (its step size is then
`weight_quant.step`, no leading dot)."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import (
    QConv2d,
    QLinear,
    SearchConv2d,
    SearchLinear,
    build_supernet,
    quantize_model,
    trace_layers,
)
from framework.sharpness import SAM, TwoPassOptimizer, is_perturbed

LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
LEARNED_RANGE = OmegaConf.merge(LSQ, {"activation": "learned_range"})  # LSQ weights, PACT-style clip


def _perturbed(model: nn.Module) -> set[str]:
    opt = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.0)], SAM(rho=0.05))
    return {name for name, _ in opt.perturbed}


@pytest.mark.parametrize("qcfg,clip", [(LSQ, None), (LEARNED_RANGE, "act_quant.range")])
@pytest.mark.parametrize("make", [lambda q: QConv2d.from_float(nn.Conv2d(2, 3, 3), 4, 4, q),
                                  lambda q: QLinear.from_float(nn.Linear(5, 3), 4, 4, q)])
def test_a_quantized_layer_as_the_root_module_keeps_its_weight_step_out(make, qcfg, clip):
    layer = make(qcfg)
    names = {n for n, _ in layer.named_parameters()}
    assert "weight_quant.step" in names  # the parameter the old substring rule (".weight_quant") missed
    assert _perturbed(layer) == {"weight", "bias"} | ({clip} if clip else set())


def test_the_root_layers_step_size_stays_put_in_the_second_pass():
    torch.manual_seed(0)
    layer = QConv2d.from_float(nn.Conv2d(2, 3, 3), 4, 4, LSQ)
    x, target = torch.randn(4, 2, 6, 6), torch.randn(4, 3, 4, 4)
    layer(x)  # initialise the LSQ step sizes from the data
    step_before, weight_before = layer.weight_quant.step.detach().clone(), layer.weight.detach().clone()
    seen = []

    def closure():
        seen.append((layer.weight_quant.step.detach().clone(), layer.weight.detach().clone()))
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        return loss

    TwoPassOptimizer(layer, [torch.optim.SGD(layer.parameters(), lr=0.0)], SAM(rho=0.5)).step(closure)
    (_, _), (step_second, weight_second) = seen
    assert torch.equal(step_second, step_before)
    assert not torch.equal(weight_second, weight_before)  # the weights did move in the second pass


def _expected(model: nn.Module, clip_of) -> set[str]:
    """The perturbed set by the rule, built from module types rather than from parameter names."""
    expected = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (QConv2d, QLinear, SearchConv2d, SearchLinear, nn.BatchNorm2d, nn.Linear, nn.Conv2d)):
            expected.add(prefix + "weight")
            if module.bias is not None:
                expected.add(prefix + "bias")
        if isinstance(module, (QConv2d, QLinear)) and clip_of(module.act_quant):
            expected.add(f"{prefix}act_quant.{clip_of(module.act_quant)}")
        if isinstance(module, (SearchConv2d, SearchLinear)):
            expected.update(f"{prefix}act_quants.{i}.{clip_of(q)}" for i, q in enumerate(module.act_quants) if clip_of(q))
    return expected


def _clip(quantizer: nn.Module) -> str | None:
    """A learned range (PACT) is perturbed; an LSQ step is not."""
    return "range" if hasattr(quantizer, "range") else None


def test_a_quantized_model_perturbs_weights_and_bn_but_no_lsq_step():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 28, 1)
    quantize_model(model, {layer.name: (4, 4) for layer in layers}, LSQ, layers)
    perturbed = _perturbed(model)
    steps = {n for n in dict(model.named_parameters()) if n.endswith(".step")}
    assert len(steps) == 2 * len(layers)  # a weight and an input step per layer
    assert perturbed == _expected(model, _clip)
    assert not steps & perturbed
    assert {"bn1.weight", "bn1.bias"} <= perturbed


def test_a_supernet_perturbs_neither_its_logits_nor_its_candidates_weight_steps():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    build_supernet(model, trace_layers(model, 28, 1), LSQ)
    names = set(dict(model.named_parameters()))
    logits = {n for n in names if n.endswith(("alpha_w", "alpha_a"))}
    steps = {n for n in names if ".weight_quants." in n or "weight_quant." in n}
    assert logits and steps
    perturbed = _perturbed(model)
    assert perturbed == _expected(model, _clip)
    assert not (logits | steps) & perturbed


@pytest.mark.parametrize("name,perturbed", [
    ("weight", True), ("act_quant.step", False), ("act_quant.range", True), ("layer1.0.bn1.bias", True),
    ("weight_quant.step", False), ("conv.weight_quant.step", False), ("conv.weight_quants.2.step", False),
    ("weight_quants.0.step", False), ("alpha_w", False), ("layer.alpha_a", False),
    ("weight_quantizer_head.weight", True),  # a module merely named alike is not a weight quantizer
])
def test_the_rule_reads_name_components(name, perturbed):
    assert is_perturbed(name) is perturbed
