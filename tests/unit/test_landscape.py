"""Loss-landscape diagnostics (framework.landscape) against closed forms: the power iteration on a
quadratic, Hessian-vector products against finite differences and through the quantizers' STE,
the surrogate gap's formula, the curve of a model trained to its minimum, filter normalisation,
and which parameters span the landscape."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from framework.landscape import (
    CrossEntropyOnBatches,
    filter_normalized_direction,
    fixed_batches,
    hessian_vector_product,
    landscape_parameters,
    loss_curve,
    loss_value,
    surrogate_gap,
    top_hessian_eigenvalue,
)
from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import build_supernet, kernels, quantize_model, trace_layers
from tests.conftest import compose_config

LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
EAGER_LSQ = LSQ  # the Hessian-vector products take the reference ops (kernels.twice_differentiable)
MINMAX = compose_config("pretrain", ["quant=minmax"]).quant


class Quadratic(nn.Module):
    """Two parameter tensors (a 3x2 matrix and a 4-vector) that flatten to one w in R^10."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(w[:6].reshape(3, 2).clone())
        self.b = nn.Parameter(w[6:].clone())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.a.flatten(), self.b])


def quadratic_problem(eigenvalues, seed=0):
    """A symmetric A with the given spectrum (a random rotation), a model at a random w, and the
    closure of L(w) = w^T A w / 2 as two terms (A split in two halves that sum to A)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    a = (a + a.T) / 2
    split = torch.rand(10, 10, generator=g, dtype=torch.float64)
    a1 = a * (split + split.T) / 2
    model = Quadratic(torch.randn(10, generator=g, dtype=torch.float64))

    def loss(m):
        w = m.flat()
        return [0.5 * w @ a1 @ w, 0.5 * w @ (a - a1) @ w]

    return a, model, loss


SPECTRUM = [7.0, 3.5, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0, -0.3, -1.2]


@pytest.mark.parametrize("hold_graphs", [False, True])
def test_power_iteration_finds_the_largest_eigenvalue_of_a_quadratic(hold_graphs):
    a, model, loss = quadratic_problem(SPECTRUM)
    params = list(model.parameters())
    expected = float(torch.linalg.eigvalsh(a).max())
    tight = top_hessian_eigenvalue(model, loss, params, max_iters=500, tol=1e-10, seed=1, hold_graphs=hold_graphs)
    assert tight.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert tight.converged and tight.rel_change < 1e-10 and tight.iterations == len(tight.history) < 500
    # the defaults' tolerance stops early and is still close (the Rayleigh quotient converges fast)
    loose = top_hessian_eigenvalue(model, loss, params, max_iters=20, tol=1e-3, seed=1, hold_graphs=hold_graphs)
    assert loose.iterations < tight.iterations
    assert loose.eigenvalue == pytest.approx(expected, rel=5e-3)
    # out of iterations: not converged, and says so
    short = top_hessian_eigenvalue(model, loss, params, max_iters=2, tol=1e-12, seed=1)
    assert short.iterations == 2 and not short.converged and short.rel_change > 1e-12
    assert top_hessian_eigenvalue(model, loss, params, max_iters=1).rel_change is None


def test_the_hessian_of_a_linear_loss_is_zero_and_exact():
    model = Quadratic(torch.arange(10, dtype=torch.float64))
    top = top_hessian_eigenvalue(model, lambda m: [m.flat().sum() * 3.0], list(model.parameters()))
    assert top.eigenvalue == 0.0 and top.converged and top.iterations == 1


def test_hessian_vector_product_of_a_quadratic_is_a_times_v():
    a, model, loss = quadratic_problem(SPECTRUM, seed=3)
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = hessian_vector_product(model, loss, list(model.parameters()), v)
    assert torch.allclose(torch.cat([hv[0].flatten(), hv[1]]), a @ torch.cat([v[0].flatten(), v[1]]))


def small_cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # running statistics that are not the defaults
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    return model.to(dtype)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    model = small_cnn()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
               for _ in range(2)]
    loss = CrossEntropyOnBatches(batches)
    params = [p for _, p in landscape_parameters(model)]
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = hessian_vector_product(model, loss, params, v)

    def grad_at(scale):
        trial = copy.deepcopy(model)
        trial_params = [p for _, p in landscape_parameters(trial)]
        with torch.no_grad():
            for p, d in zip(trial_params, v, strict=True):
                p.add_(d, alpha=scale)
        trial.eval()
        total = sum(loss(trial))
        return torch.autograd.grad(total, trial_params)

    eps = 1e-5
    plus, minus = grad_at(eps), grad_at(-eps)
    for h, gp, gm in zip(hv, plus, minus, strict=True):
        assert torch.allclose(h, (gp - gm) / (2 * eps), rtol=1e-5, atol=1e-7)
    assert model.training  # measured in eval mode, handed back in the mode it came in


def quantized_cnn(qcfg=EAGER_LSQ):
    model = small_cnn(dtype=torch.float32)
    quantize_model(model, {"0": (4, 4), "4": (4, 4)}, qcfg)
    model.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 6, 6, generator=g)
    model(images)  # LSQ initialises its steps on the first batch
    return model, CrossEntropyOnBatches([(images, torch.randint(0, 3, (16,), generator=g))])


def test_double_backward_through_the_lsq_op_is_the_straight_through_estimator():
    """The reference LSQ op and LSQ written as plain tensor ops with round_ste (which autograd
    differentiates twice by itself) give the same Hessian-vector products."""
    from framework.quant import compiled, reference

    model, loss = quantized_cnn()
    params = [p for _, p in landscape_parameters(model)]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in params]
    hv_reference = hessian_vector_product(model, loss, params, v)

    class PlainLSQ(kernels.Backend):
        twice_differentiable = True

        def lsq(self, x, step, qn, qp, grad_scale):
            return compiled.lsq_fake_quant(x, step, *x.new_tensor([qn, qp, grad_scale]))

    before = kernels._ACTIVE
    kernels._ACTIVE = PlainLSQ()
    try:
        hv_plain = hessian_vector_product(model, loss, params, v)
    finally:
        kernels._ACTIVE = before
    assert reference.lsq is not None and any(h.abs().sum() > 0 for h in hv_reference)
    for a, b in zip(hv_reference, hv_plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("qcfg", [EAGER_LSQ, OmegaConf.merge(MINMAX, {"activation": "learned_range"})],
                         ids=["lsq", "minmax-learned_range"])
def test_the_hessian_through_every_quantizer_is_symmetric(qcfg):
    """u^T H v = v^T H u through each quantizer's double backward: one consistent Hessian."""
    model, loss = quantized_cnn(qcfg)
    params = [p for _, p in landscape_parameters(model)]
    g = torch.Generator().manual_seed(5)
    u, v = ([torch.randn(p.shape, generator=g) for p in params] for _ in range(2))
    hu, hv = hessian_vector_product(model, loss, params, u), hessian_vector_product(model, loss, params, v)
    uhv = sum(float((a * b).sum()) for a, b in zip(u, hv, strict=True))
    vhu = sum(float((a * b).sum()) for a, b in zip(v, hu, strict=True))
    assert uhv != 0 and uhv == pytest.approx(vhu, rel=1e-4)


def test_the_hessian_of_a_model_on_the_native_kernels_is_taken_through_the_reference_ops():
    """With the (once-differentiable) native backend active, the products still run: inside them the
    quantizers take the reference ops; the same products as with the reference backend."""
    model, loss = quantized_cnn()
    params = [p for _, p in landscape_parameters(model)]
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]
    with kernels.using("reference"):
        want = hessian_vector_product(model, loss, params, v)
    with kernels.using("auto"):
        got = hessian_vector_product(model, loss, params, v)
        assert kernels.active().name == kernels.resolve("auto").name
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_surrogate_gap_on_a_quadratic_equals_its_closed_form():
    a, model, loss = quadratic_problem(SPECTRUM, seed=5)
    w = model.flat().detach().clone()
    g = a @ w
    for rho in (0.05, 0.5):
        gap = surrogate_gap(model, loss, list(model.parameters()), rho=rho)
        closed = rho * g.norm() + 0.5 * rho**2 * (g @ a @ g) / (g @ g)
        assert gap.gap == pytest.approx(float(closed), rel=1e-9)
        assert gap.loss == pytest.approx(float(0.5 * w @ a @ w), rel=1e-12)
        assert gap.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
        assert torch.equal(model.flat().detach(), w)  # restored bit for bit
    assert surrogate_gap(model, loss, list(model.parameters()), rho=0.0).gap == 0.0


def trained_logistic_regression():
    """Multinomial logistic regression on noisy (non-separable) data, trained full-batch (L-BFGS)
    until the gradient vanishes: its loss is convex, so this is the minimum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64) + 2.0 * torch.randn(300, 3, generator=g,
                                                                                      dtype=torch.float64)).argmax(1)
    model = nn.Linear(4, 3).to(torch.float64)
    loss = CrossEntropyOnBatches([(x[:150], y[:150]), (x[150:], y[150:])])
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        total = sum(loss(model))
        total.backward()
        return total

    optimizer.step(closure)
    closure()
    assert max(p.grad.abs().max() for p in model.parameters()) < 1e-8
    return model, loss


def test_the_curve_of_a_model_at_its_minimum_is_lowest_at_zero():
    model, loss = trained_logistic_regression()
    params = [p for _, p in landscape_parameters(model)]
    before = [p.detach().clone() for p in params]
    curve = loss_curve(model, loss, params, filter_normalized_direction(params, seed=0), span=1.0, points=21)
    assert curve.t[0] == -1.0 and curve.t[-1] == 1.0 and curve.t[10] == 0.0 and len(curve.loss) == 21
    assert curve.argmin == 0.0
    assert curve.loss[10] == pytest.approx(loss_value(model, loss), rel=1e-12)
    # convex along the line: falls to t = 0, rises after it
    assert all(a > b for a, b in zip(curve.loss[:10], curve.loss[1:11], strict=True))
    assert all(a < b for a, b in zip(curve.loss[10:-1], curve.loss[11:], strict=True))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # at a minimum the gap is second order: at most rho^2 / 2 times the top eigenvalue (+ O(rho^3))
    rho, top = 0.05, top_hessian_eigenvalue(model, loss, params, max_iters=200, tol=1e-9)
    assert 0 < surrogate_gap(model, loss, params, rho=rho).gap <= 0.5 * rho**2 * top.eigenvalue * 1.01


def test_filter_normalisation_gives_each_filter_the_norm_of_its_weights():
    model = small_cnn(dtype=torch.float32)
    named = landscape_parameters(model)
    params = [p for _, p in named]
    direction = filter_normalized_direction(params, seed=3)
    assert [n for n, _ in named] == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    for (name, w), d in zip(named, direction, strict=True):
        assert d.shape == w.shape
        if w.dim() == 1:  # conv and linear biases, batch-norm weight and bias
            assert torch.count_nonzero(d) == 0, name
        else:  # conv output channels, linear rows
            assert torch.allclose(d.flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-5), name
            assert not torch.allclose(d, w.detach())
    again = filter_normalized_direction(params, seed=3)
    other = filter_normalized_direction(params, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(direction, again, strict=True))
    assert not torch.equal(direction[0], other[0])


def test_quantizer_steps_ranges_and_logits_are_not_landscape_parameters():
    float_model = create_model("resnet8", num_classes=10, in_channels=1)
    float_names = {n for n, _ in float_model.named_parameters()}
    layers = trace_layers(float_model, 28, 1)
    assert {n for n, _ in landscape_parameters(float_model)} == float_names  # convs, BN, fc: everything

    quantized = quantize_model(copy.deepcopy(float_model), {layer.name: (4, 4) for layer in layers}, LSQ, layers)
    supernet = build_supernet(copy.deepcopy(float_model), layers, MINMAX)
    learned_range = build_supernet(copy.deepcopy(float_model), layers, OmegaConf.merge(MINMAX, {"activation": "learned_range"}))
    for model in (quantized, supernet, learned_range):
        names = {n for n, _ in landscape_parameters(model)}
        extra = {n for n, _ in model.named_parameters()} - names
        assert names == float_names  # the same weights, under the same names
        assert extra and all(n.rsplit(".", 1)[-1] in ("step", "range", "alpha_w", "alpha_a") for n in extra), extra


def test_fixed_batches_are_a_seeded_choice_and_the_loss_their_mean():
    data = torch.utils.data.TensorDataset(torch.arange(50, dtype=torch.float32).unsqueeze(1), torch.arange(50) % 2)
    first, again, other = (fixed_batches(data, 3, 8, seed) for seed in (0, 0, 1))
    assert [len(y) for _, y in first] == [8, 8, 8]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    chosen = torch.cat([x for x, _ in first]).flatten()
    assert len(set(chosen.tolist())) == 24  # without replacement
    assert [len(y) for _, y in fixed_batches(data, 10, 8, 0)] == [8] * 6 + [2]  # all 50 when asked for more

    model = nn.Linear(1, 2)
    loss = CrossEntropyOnBatches(first)
    x, y = torch.cat([b[0] for b in first]), torch.cat([b[1] for b in first])
    assert loss_value(model, loss) == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
