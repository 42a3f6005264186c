"""The two-pass optimizers: exactness at radius 0, ASGA's update by hand, the adaptive radius,
SAQ's case 2 versus case 3, and logits that are never perturbed."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import QConv2d, build_supernet, quantize_model, trace_layers
from framework.sharpness import ASGA, SAM, TwoPassOptimizer, adaptive_radius
from tests.conftest import compose_config

MINMAX = compose_config("pretrain", ["quant=minmax"]).quant  # minmax.yaml builds on lsq.yaml
LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("rule", [SAM(rho=0.0), ASGA(rho=0.0, lookback=0.0, adaptive=False)])
def test_radius_zero_equals_the_base_optimizer_exactly(rule):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    reference = copy.deepcopy(model)
    x, y = _batch()
    base = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    two_pass = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)], rule)
    for _ in range(3):
        base.zero_grad()
        _closure(reference, x, y)()
        base.step()
        two_pass.step(_closure(model, x, y))
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_asga_update_on_a_quadratic_equals_the_formula():
    """L(w) = 1/2 w^T A w: g = A w, theta_hat = w + (rho/||g|| - a) g, update = (g + A theta_hat)/2."""
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]])
    w0 = torch.tensor([1.0, -2.0])
    w = nn.Parameter(w0.clone())
    holder = nn.Module()
    holder.w = w
    rho, a, lr = 0.1, 0.01, 0.2
    rule = ASGA(rho=rho, lookback=a, adaptive=False)
    opt = TwoPassOptimizer(holder, [torch.optim.SGD([w], lr=lr)], rule)

    def closure():
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    info = opt.step(closure)
    g = A @ w0
    theta_hat = w0 + (rho / g.norm() - a) * g
    expected = w0 - lr * (g + A @ theta_hat) / 2
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert rule.last_gap == pytest.approx(float(0.5 * theta_hat @ A @ theta_hat - 0.5 * w0 @ A @ w0), rel=1e-5)
    assert info["loss_perturbed"] == pytest.approx(float(0.5 * theta_hat @ A @ theta_hat), rel=1e-5)


def test_adaptive_radius_follows_the_clipped_log_of_the_gap_ema():
    rule = ASGA(rho=0.05, rho_min=0.01, rho_max=0.3, ema_momentum=0.9)
    gaps = [0.2, 0.05, -0.4, 0.9, 3.0]
    ema = None
    for h in gaps:
        rule.after_step(1.0, 1.0 + h)
        ema = h if ema is None else 0.9 * ema + 0.1 * h
        assert rule.gap_ema == pytest.approx(ema)
        assert rule.rho == pytest.approx(min(max(math.log1p(max(ema, 0.0)), 0.01), 0.3))
    assert adaptive_radius(-5.0, 0.01, 0.3) == 0.01
    assert adaptive_radius(100.0, 0.01, 0.3) == 0.3
    assert adaptive_radius(0.1, 0.01, 0.3) == pytest.approx(math.log(1.1))


def _radius_after(rule: ASGA, steps: int) -> float:
    """rho after `steps` ASGA steps on L(w) = 1/2 w^T A w from the same start (||g|| ~ 0.3 < 1)."""
    A = torch.diag(torch.tensor([0.3, 0.1]))
    holder = nn.Module()
    holder.w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = TwoPassOptimizer(holder, [torch.optim.SGD([holder.w], lr=0.01)], rule)

    def closure():
        loss = 0.5 * holder.w @ A @ holder.w
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return rule.rho


def test_the_per_radius_gap_is_scale_free_where_the_absolute_gap_collapses():
    """With ||g|| < 1 the absolute rule's map rho -> ln(1 + rho ||g||) shrinks rho to rho_min from any start;
    the gap per unit length (about ||g||, whatever rho is) sends every start to the same radius ln(1 + ~||g||)."""
    starts = (0.02, 0.25)
    absolute = [_radius_after(ASGA(rho=r, lookback=0.0, rho_min=0.001, rho_max=1.0), 60) for r in starts]
    scale_free = [_radius_after(ASGA(rho=r, lookback=0.0, rho_min=0.001, rho_max=1.0, gap="per_radius"), 60) for r in starts]
    assert max(absolute) < 0.002  # collapsed to rho_min (0.001) from both starts
    grad_norm = float(torch.tensor([0.3, -0.1]).norm())  # ||A w0||; w moves little at lr 0.01
    for rho in scale_free:
        assert rho == pytest.approx(math.log1p(grad_norm), rel=0.15)
    assert scale_free[0] == pytest.approx(scale_free[1], rel=0.02)


def test_an_unknown_gap_is_refused_by_the_config():
    from framework.config import validate_config
    from framework.errors import MPQError

    cfg = compose_config(["stage=search", "search=asga", "search.sharpness.gap=relative"])
    with pytest.raises(MPQError, match="gap"):
        validate_config(cfg)


@pytest.mark.parametrize("rule", [SAM(rho=0.05), ASGA(rho=0.05)], ids=["sam", "asga"])
def test_the_state_logs_the_gradient_norm_the_radius_was_divided_by(rule):
    """||g|| beside rho at every two-pass step: ASGA's gap h ~ rho ||g|| makes its radius follow ||g||."""
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])]
    eps = rule.perturbation(grads, [torch.zeros(2), torch.zeros(1, 2)])
    assert rule.state()["grad_norm"] == pytest.approx(5.0)
    lookback = getattr(rule, "lookback", 0.0)
    assert float(torch.cat([e.flatten() for e in eps]).norm()) == pytest.approx(5.0 * (0.05 / 5.0 - lookback))


def _qat_model():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 28, 1)
    quantize_model(model, {layer.name: (2, 32) for layer in layers}, LSQ, layers)
    model.eval()  # fixed BN statistics: the outputs depend on the weights alone
    x, _ = _batch(1)
    model(x)  # initialise LSQ steps
    with torch.no_grad():  # latent weights on the grid: a perturbation below half a step rounds away
        for m in model.modules():
            if isinstance(m, QConv2d):
                m.weight.copy_(m.weight_quant(m.weight))
    return model


def _second_pass_output(case, rho):
    model = _qat_model()
    x, y = _batch(2)
    outputs = []

    def closure():
        out = model(x)
        outputs.append(out.detach())
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss

    opt = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.0)], SAM(rho=rho), saq_case=case)
    # perturb only the conv weights so BN/bias perturbations do not hide the rounding effect
    opt.perturbed = [(n, p) for n, p in opt.perturbed if n.endswith("conv1.weight") or n.endswith("conv2.weight")]
    opt.step(closure)
    return outputs[0], outputs[1]


def test_saq_case2_rounds_a_small_perturbation_away_but_case3_does_not():
    model = _qat_model()
    half_step = min(m.weight_quant.step.item() for m in model.modules() if isinstance(m, QConv2d) and m.w_bits == 2) / 2
    rho = 0.2 * half_step  # ||eps|| = rho, so every element of eps is below half a quantization step
    plain_2, perturbed_2 = _second_pass_output(2, rho)
    plain_3, perturbed_3 = _second_pass_output(3, rho)
    assert torch.equal(plain_2, plain_3)
    # case 2: Q(w + eps) == Q(w) unless a weight sits within eps of a rounding threshold
    changed_2 = (perturbed_2 - plain_2).abs().max().item()
    changed_3 = (perturbed_3 - plain_3).abs().max().item()
    assert changed_2 < 1e-6 < changed_3


def test_saq_case1_adds_the_latent_gradient_after_quantization():
    model = _qat_model()
    x, y = _batch(3)
    seen = []

    def closure():
        seen.append({n: m.weight_eps for n, m in model.named_modules() if isinstance(m, QConv2d) and m.w_bits < 32})
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.0)], SAM(rho=0.05), saq_case=1)
    opt.step(closure)
    assert all(e is None for e in seen[0].values())
    assert all(e is not None and e.abs().sum() > 0 for e in seen[1].values())
    for name, p in model.named_parameters():  # lr 0: everything restored exactly
        assert torch.equal(p, weights[name]), name


def test_logits_are_never_perturbed():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    build_supernet(model, trace_layers(model, 28, 1), MINMAX)
    logits = {n: p for n, p in model.named_parameters() if n.endswith(("alpha_w", "alpha_a"))}
    before = {n: p.detach().clone() for n, p in logits.items()}
    conv_before = model.layer1[0].conv1.weight.detach().clone()
    x, y = _batch(4)
    during = []

    def closure():
        during.append(({n: p.detach().clone() for n, p in logits.items()}, model.layer1[0].conv1.weight.detach().clone()))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.0)], ASGA(rho=0.5))
    assert not any(n.endswith(("alpha_w", "alpha_a")) for n, _ in opt.perturbed)
    opt.step(closure)
    second_logits, second_conv = during[1]
    for n in logits:
        assert torch.equal(second_logits[n], before[n]), n
    assert not torch.equal(second_conv, conv_before)  # the weights were perturbed in pass 2


def test_periodic_variant_runs_two_passes_every_k_steps():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    calls = []

    def closure():
        calls.append(1)
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        return loss

    opt = TwoPassOptimizer(model, [torch.optim.SGD(model.parameters(), lr=0.01)], SAM(rho=0.05), period=5)
    for _ in range(10):
        opt.step(closure)
    assert len(calls) == 10 + 2  # two-pass at steps 0 and 5
