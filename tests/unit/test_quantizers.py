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


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("bits", [(2, 3, 4, 6), (4, 8), (3, 32), (8,)])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 7)])
def test_the_one_op_min_max_weight_mix_equals_the_sum_of_quantizers(bits, shape, backend):
    from framework.quant import kernels, native

    if backend == "native" and not native.available():
        pytest.skip("the C kernels do not build here (no C compiler)")
    from framework.quant.quantizers import MinMaxWeightQuantizer, mixed_minmax_weight

    torch.manual_seed(len(bits) * 10 + len(shape))
    w = torch.randn(*shape).requires_grad_()
    alpha = torch.randn(len(bits), requires_grad=True)
    upstream = torch.randn(*shape)
    ref = sum(p * MinMaxWeightQuantizer(b)(w) for p, b in zip(alpha.softmax(0), bits, strict=True))
    (ref * upstream).sum().backward()
    ref_gw, ref_ga = w.grad.clone(), alpha.grad.clone()
    w.grad, alpha.grad = None, None
    with kernels.using(backend):
        out = mixed_minmax_weight(w, alpha.softmax(0), bits)
    (out * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(w.grad, ref_gw, atol=1e-6)
    assert torch.allclose(alpha.grad, ref_ga, atol=1e-5)


# -- the defects an audit found, each fixed and tested ----------------------------------------------------

def test_an_lsq_activation_step_learns_alike_at_any_micro_batch_size():
    """LSQ's gradient scale counts an activation's features per example (not the micro-batch's
    elements): one batch of 128 and two accumulated micro-batches of 64 give the step the same
    gradient (a mean loss per micro-batch, divided by the accumulation count)."""
    torch.manual_seed(0)
    x = torch.randn(128, 4, 5, 5).relu() * 3
    target = torch.randn(128, 4, 5, 5)
    grads = []
    for chunks in (1, 2, 4):
        q = LSQQuantizer(3, signed=None, activation=True)
        q.set_step(0.4)
        for part, want in zip(x.chunk(chunks), target.chunk(chunks), strict=True):
            (((q(part) - want) ** 2).mean() / chunks).backward()
        grads.append(q.step.grad.item())
    assert grads[0] != 0
    assert grads[1] == pytest.approx(grads[0], rel=1e-5) and grads[2] == pytest.approx(grads[0], rel=1e-5)
    q = LSQQuantizer(3, signed=False, activation=True)
    assert q.grad_scale(x) == pytest.approx(1 / math.sqrt(4 * 5 * 5 * 7))  # features per example x Qp


def test_a_learned_step_is_kept_positive():
    """An update that takes a step below zero: the forward pass quantizes with MIN_STEP (no division
    by zero, no sign flip), the gradient still reaches the step (it can recover), and the parameter is
    left as the optimizer set it (a two-pass optimizer restores a perturbed step by subtraction)."""
    from framework.quant.reference import MIN_STEP

    q = LSQQuantizer(4, signed=True)
    q.set_step(0.1)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    x = torch.linspace(-3, 3, 50)
    q.step.grad = torch.tensor([0.5])  # a step of -0.4 after the update
    opt.step()
    assert q.step.item() == pytest.approx(-0.4)
    y = q(x)
    floor = LSQQuantizer(4, signed=True)
    floor.set_step(MIN_STEP)
    assert torch.equal(y, floor(x)) and torch.isfinite(y).all()
    assert torch.all(torch.sign(y) * torch.sign(x) >= 0)  # no sign flip
    q.step.grad = None
    y.sum().backward()
    assert q.step.grad is not None and q.step.grad.item() != 0
    assert q.step.item() == pytest.approx(-0.4)


def test_an_8_bit_image_input_is_initialised_to_use_its_range():
    """The MSE initialisation gives a normalised image's 8-bit input most of its 256 codes (LSQ's
    `2 mean|x| / sqrt(Qp)`, made for weights, gives it a few dozen)."""
    from framework.quant.quantizers import int_range

    torch.manual_seed(0)
    pixels = torch.rand(64, 1, 28, 28) ** 3  # mostly dark, as Fashion-MNIST
    image = (pixels - 0.286) / 0.353
    codes = {}
    for init in ("mse", "lsq"):
        q = LSQQuantizer(8, signed=None, activation=True, init=init)
        q(image)
        qn, qp = int_range(8, bool(q._signed))
        levels = torch.round(image / q.step).clamp(qn, qp)
        codes[init] = len(torch.unique(levels))
    assert codes["mse"] >= 128 > 4 * codes["lsq"] // 2, codes


def test_mse_step_minimises_the_quantization_error_over_its_grid():
    from framework.quant.quantizers import mse_step

    torch.manual_seed(1)
    x = torch.randn(10_000)
    best = mse_step(x, -8, 7)
    error = lambda s: float(((torch.round(x / s).clamp(-8, 7) * s - x) ** 2).mean())  # noqa: E731
    top = float(x.abs().max()) / 7
    grid = [float(x.max()) / 7 * k / 100 for k in range(1, 101)] + [top]
    assert error(best) <= min(error(s) for s in grid) + 1e-12
    assert float(best) < top  # clipping the tails pays at 4 bits
