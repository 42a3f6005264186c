"""Quantizers against closed-form values (METHOD.md sec. 1), including LSQ's step-size gradient."""

import math

import pytest
import torch

from framework.quant.quantizers import (
    LearnedRangeActQuantizer,
    LSQQuantizer,
    MinMaxWeightQuantizer,
    round_ste,
)


def _lsq(bits, step, signed=True):
    q = LSQQuantizer(bits, signed=signed)
    q.set_step(step)
    return q


def test_round_ste_passes_the_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    assert torch.equal(x.grad, torch.ones(3))


def test_lsq_signed_forward_and_gradients_closed_form():
    # 3 bits signed: Qn = -4, Qp = 3; s = 0.5; x/s = [-6, -1.48, 0.2, 0.52, 2.4, 10]
    q = _lsq(3, 0.5)
    x = torch.tensor([-3.0, -0.74, 0.1, 0.26, 1.2, 5.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 1.5]))
    y.sum().backward()
    # d q / d x: 1 inside the range, 0 where clipped
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    # d q / d s: Qn below, round(x/s) - x/s inside, Qp above; times g = 1/sqrt(N * Qp)
    per_element = [-4, -1 + 1.48, 0 - 0.2, 1 - 0.52, 2 - 2.4, 3]
    expected = sum(per_element) / math.sqrt(6 * 3)
    assert q.step.grad.item() == pytest.approx(expected, rel=1e-5)


def test_lsq_unsigned_activation_range():
    # 2 bits unsigned: Qn = 0, Qp = 3
    q = _lsq(2, 1.0, signed=False)
    x = torch.tensor([-1.0, 0.4, 0.6, 2.2, 7.0])
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]))


def test_lsq_initialisation_per_tensor_and_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q = LSQQuantizer(4, signed=True)
    q(w)
    assert bool(q.initialized)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7))
    qc = LSQQuantizer(4, signed=True, per_channel=True, channels=2)
    qc(w)
    assert torch.allclose(qc.step, torch.tensor([2 * 2.0 / math.sqrt(7), 2 * 0.5 / math.sqrt(7)]))


def test_lsq_per_channel_step_gradient_uses_elements_per_channel():
    q = LSQQuantizer(2, signed=True, per_channel=True, channels=2)  # Qn=-2, Qp=1
    q.set_step(torch.tensor([1.0, 2.0]))
    w = torch.tensor([[0.3, 5.0, -5.0], [1.0, 0.0, 0.4]])
    q(w).sum().backward()
    # channel 0: x/s = [0.3, 5, -5] -> [0 - 0.3, Qp=1, Qn=-2]; channel 1: x/s = [0.5, 0, 0.2] -> [0-0.5 (round half to even), 0, -0.2]
    g = 1 / math.sqrt(3 * 1)
    assert torch.allclose(q.step.grad, torch.tensor([(-0.3 + 1 - 2) * g, (-0.5 + 0 - 0.2) * g]), atol=1e-6)


def test_activation_sign_is_decided_on_the_first_batch():
    q = LSQQuantizer(4, signed=None)
    q(torch.tensor([-1.0, 2.0]))
    assert int(q.signed) == 1
    q2 = LSQQuantizer(4, signed=None)
    q2(torch.tensor([0.0, 2.0]))
    assert int(q2.signed) == 0


def test_minmax_weights_closed_form():
    # 3 bits: Qp = 3, s = max|w| / 3 = 1/3
    q = MinMaxWeightQuantizer(3)
    w = torch.tensor([-1.0, 0.2, 0.49, 0.7], requires_grad=True)
    y = q(w)
    assert torch.allclose(y, torch.tensor([-1.0, 1 / 3, 1 / 3, 2 / 3]))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(4))


def test_learned_range_forward_and_range_gradient_closed_form():
    # 2 bits on [0, r], r = 1: s = 1/3
    q = LearnedRangeActQuantizer(2, init_range=1.0, signed=False)
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 2.0])
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0]))
    y.sum().backward()
    # d q / d r: 0 below 0; (round(x/s) - x/s) / 3 inside; 1 where clipped at r
    expected = 0 + (0 - 0.3) / 3 + (1 - 0.6) / 3 + (2 - 1.5) / 3 + 1
    assert q.range.grad.item() == pytest.approx(expected, rel=1e-5)


def test_learned_range_signed_input_uses_a_symmetric_range():
    q = LearnedRangeActQuantizer(3, init_range=1.0)  # sign from data: signed -> levels 3, s = 1/3
    y = q(torch.tensor([-2.0, -0.5, 0.4]))
    assert torch.allclose(y, torch.tensor([-1.0, -2 / 3, 1 / 3]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LSQQuantizer(32, signed=True),
        lambda: LSQQuantizer(32, signed=None),
        lambda: MinMaxWeightQuantizer(32),
        lambda: LearnedRangeActQuantizer(32),
    ],
)
def test_32_bits_is_exactly_the_identity(make):
    q = make()
    x = torch.randn(4, 5, requires_grad=True)
    y = q(x)
    assert y is x
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match="unsupported bit-width 1"):
        LSQQuantizer(1)


@pytest.fixture(params=["native", "compiled"])
def kernel(request, monkeypatch):
    """Each fused path in turn: the C kernels (framework.quant.native), then torch.compile's alone."""
    from framework.quant import fused, native

    if request.param == "native":
        if not native.available():
            pytest.skip("the C kernels do not build here (no C compiler)")
    else:
        monkeypatch.setattr(native, "usable", lambda x: False)
        monkeypatch.setattr(fused, "COMPILED_MIN_ELEMENTS", 0)  # the compiled kernel even for a small tensor
    return request.param


def test_fused_lsq_equals_the_autograd_function(kernel):
    torch.manual_seed(0)
    for per_channel, signed in ((False, True), (True, True), (False, False)):
        x = (torch.randn(6, 5, 4, 4) * 2).requires_grad_()
        plain = LSQQuantizer(3, signed=signed, per_channel=per_channel, channels=6)
        fused = LSQQuantizer(3, signed=signed, per_channel=per_channel, channels=6, fused=True)
        steps = torch.rand(6) * 0.5 + 0.1 if per_channel else torch.tensor([0.37])
        plain.set_step(steps)
        fused.set_step(steps)
        y1 = plain(x)
        (y1 * torch.linspace(-1, 1, y1.numel()).view_as(y1)).sum().backward()
        gx1, gs1 = x.grad.clone(), plain.step.grad.clone()
        x.grad = None
        y2 = fused(x)
        (y2 * torch.linspace(-1, 1, y2.numel()).view_as(y2)).sum().backward()
        assert torch.allclose(y1, y2, atol=1e-6)
        assert torch.allclose(gx1, x.grad)
        assert torch.allclose(gs1, fused.step.grad, rtol=1e-4, atol=1e-7)


def test_fused_mixed_activation_equals_the_sum_of_quantizers(kernel):
    from framework.quant.fused import fused_mixed_learned_range

    torch.manual_seed(0)
    for signed in (False, True):
        x = (torch.randn(4, 3, 5, 5) * 4).requires_grad_()
        if not signed:
            x = x.detach().relu().requires_grad_()
        quantizers = [LearnedRangeActQuantizer(b, init_range=r, signed=signed) for b, r in ((2, 1.5), (3, 2.0), (4, 3.0), (6, 6.0))]
        alpha = torch.tensor([0.3, -0.2, 0.9, 0.1], requires_grad=True)
        weights = torch.linspace(-1, 1, x.numel()).view_as(x)
        ref = sum(p * q(x) for p, q in zip(alpha.softmax(0), quantizers, strict=True))
        (ref * weights).sum().backward()
        ref_grads = (x.grad.clone(), alpha.grad.clone(), [q.range.grad.clone() for q in quantizers])
        x.grad, alpha.grad = None, None
        for q in quantizers:
            q.range.grad = None
        levels = tuple((2 ** (q.bits - 1) - 1) if signed else (2**q.bits - 1) for q in quantizers)
        ranges = torch.stack([q.range for q in quantizers]).abs() + 1e-8
        out = fused_mixed_learned_range(x, alpha.softmax(0), ranges, levels, signed)
        (out * weights).sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(x.grad, ref_grads[0], atol=1e-5)
        assert torch.allclose(alpha.grad, ref_grads[1], atol=1e-4)
        for q, g in zip(quantizers, ref_grads[2], strict=True):
            assert torch.allclose(q.range.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd-function", "native"])
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (4, 8), (3, 32), (8,)])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 7)])
def test_the_one_op_min_max_weight_mix_equals_the_sum_of_quantizers(bits, shape, fused):
    from framework.quant.quantizers import MinMaxWeightQuantizer, mixed_minmax_weight

    torch.manual_seed(len(bits) * 10 + len(shape))
    w = torch.randn(*shape).requires_grad_()
    alpha = torch.randn(len(bits), requires_grad=True)
    upstream = torch.randn(*shape)
    ref = sum(p * MinMaxWeightQuantizer(b)(w) for p, b in zip(alpha.softmax(0), bits, strict=True))
    (ref * upstream).sum().backward()
    ref_gw, ref_ga = w.grad.clone(), alpha.grad.clone()
    w.grad, alpha.grad = None, None
    out = mixed_minmax_weight(w, alpha.softmax(0), bits, fused)
    (out * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(w.grad, ref_gw, atol=1e-6)
    assert torch.allclose(alpha.grad, ref_ga, atol=1e-5)
