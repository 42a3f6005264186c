"""The C kernels of the quantizers (framework/quant/native) against the plain torch ops: every
output and gradient, on tensors that span several chunks and both threads, alone and inside the
two-pass (ASGA, SAM) steps; their build (cached, atomic) and the fallback where they cannot build."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.models import create_model
from framework.quant import build_supernet, native, quantize_model, trace_layers
from framework.quant.fused import fused_lsq, fused_mixed_learned_range, lsq_fake_quant, mixed_learned_range
from framework.quant.layers import SearchConv2d
from framework.quant.quantizers import LearnedRangeActQuantizer, mixed_minmax_weight
from framework.search.step import SearchStep
from framework.sharpness import TwoPassOptimizer, build_rule
from tests.conftest import compose_config

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels do not build here (no C compiler)")

# several 2048-element chunks and a ragged end, so both threads and the scalar tail are exercised
SHAPE = (5, 7, 13, 17)


def _grads(fn, x, *params, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("k", [1, 4, 5], ids=["1-candidate", "4-candidates", "5-candidates"])
def test_mixed_activation_equals_the_plain_ops_on_several_chunks(signed, k):
    """Up to 4 candidates take the one-pass AVX-512 code where the CPU has it, 5 the per-candidate
    loops: both equal the plain ops, with ties at the ranges and exact zeros in the input."""
    torch.manual_seed(1)
    x = torch.randn(SHAPE) * 3
    x = x if signed else x.relu()
    upstream = torch.randn(SHAPE)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])[:k]
    ranges, levels = torch.tensor([0.7, 1.5, 2.5, 4.0, 3.0])[:k], (3, 7, 15, 63, 255)[:k]
    if signed:
        levels = (1, 3, 7, 31, 127)[:k]
    x.view(-1)[::9] = ranges[0]  # ties at a range
    x.view(-1)[1::9] = 0.0

    def run(fn):
        return _grads(lambda a, p, r: fn(a, p, r, levels, signed), x, probs, ranges, upstream=upstream)

    (out, grads), (ref, ref_grads) = run(native.mixed_learned_range), run(mixed_learned_range)
    assert torch.equal(out, ref)  # the same divisions and roundings, added in the same order
    assert torch.allclose(grads[0], ref_grads[0], atol=1e-6)
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):  # sums over 7,735 elements
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("signed", [False, True])
def test_the_mixes_with_their_logits_and_ranges_in_the_call_equal_the_plain_ops(signed):
    """softmax(logits) and |rho| + 1e-8 inside the kernels' call: the same output bit for bit, and the
    gradients of the logits and of every range parameter, a negative one included (its sign flips
    its gradient), as the plain softmax, stack, abs and add give them."""
    torch.manual_seed(4)
    x = torch.randn(SHAPE) * 3
    x = x if signed else x.relu()
    upstream = torch.randn(SHAPE)
    logits, rhos = torch.randn(4), [torch.tensor(v) for v in (0.7, -1.5, 2.5, 4.0)]
    levels = (1, 3, 7, 31) if signed else (3, 7, 15, 63)

    def in_call(a, lg, *r):
        return native.mixed_learned_range_of_params(a, lg, list(r), levels, signed)

    def plain(a, lg, *r):
        return mixed_learned_range(a, torch.softmax(lg, 0), torch.stack(r).abs() + 1e-8, levels, signed)

    (out, grads), (ref, ref_grads) = _grads(in_call, x, logits, *rhos, upstream=upstream), _grads(plain, x, logits, *rhos, upstream=upstream)
    assert torch.equal(out, ref)
    assert torch.allclose(grads[0], ref_grads[0], atol=1e-6)
    assert all(g.shape == () for g in grads[2:])
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
    assert float(grads[3]) != 0.0 and float(grads[3]) * float(ref_grads[3]) > 0  # the negative rho's

    w, upstream_w = torch.randn(24, 16, 3, 3), torch.randn(24, 16, 3, 3)
    qps = torch.tensor([1.0, 3.0, 7.0, 31.0])
    (out, grads), (ref, ref_grads) = (
        _grads(lambda a, lg: native.mixed_minmax_of_logits(a, lg, qps), w, logits, upstream=upstream_w),
        _grads(lambda a, lg: mixed_minmax_weight(a, torch.softmax(lg, 0), (2, 3, 4, 6)), w, logits, upstream=upstream_w))
    assert torch.equal(out, ref)
    assert torch.allclose(grads[0], ref_grads[0], atol=1e-6)
    assert torch.allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_a_fixed_learned_range_quantizer_with_the_c_kernel_equals_its_eager_op(signed):
    """The supernet's fixed 8-bit layers quantize their input with one learned range: with `fused`
    that is the mix kernel with one candidate, the same output bit for bit and the same gradients
    (no input lies exactly on the range, where the two split the gradient differently)."""
    torch.manual_seed(6)
    x = torch.randn(SHAPE) * 2
    x = x if signed else x.relu()
    upstream = torch.randn(SHAPE)
    outs = []
    for fused in (True, False):
        quantizer = LearnedRangeActQuantizer(8, init_range=-2.5, signed=signed, fused=fused)  # a negative rho
        leaf = x.clone().requires_grad_()
        out = quantizer(leaf)
        (out * upstream).sum().backward()
        outs.append((out.detach(), leaf.grad, quantizer.range.grad))
    (out, gx, gr), (ref, ref_gx, ref_gr) = outs
    assert torch.equal(out, ref)
    assert torch.allclose(gx, ref_gx, atol=1e-6)
    assert torch.allclose(gr, ref_gr, rtol=1e-4, atol=1e-4) and float(gr) != 0.0


def _supernet_layer(overrides=()):
    scfg = compose_config("search", ["search=asga", *overrides]).search
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=3)
    build_supernet(model, trace_layers(model, 16, 3), scfg.quant)
    return model, [m for m in model.modules() if isinstance(m, SearchConv2d)]


def _grad_fns(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that lead to `t`."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn.name() in seen:
            continue
        seen.add(fn.name())
        todo += [f for f, _ in fn.next_functions]
    return seen


def test_a_supernet_layer_takes_the_in_call_mixes_where_they_apply():
    """With the C kernels, a supernet layer is one node per mix (no softmax, stack or abs nodes);
    with Gumbel sampling (probabilities drawn in Python) or the kernels off, the separate ops."""
    images = _batch()[0]
    model, layers = _supernet_layer()
    model.train()(images)  # the first call fixes the activations' signs
    layer = layers[1]
    x = torch.rand(2, layer.in_channels, 8, 8)
    x_mix, w_mix = layer.mixed_input_and_weight(x)
    assert {"_MixedRangeOfParamsBackward", "_MixedMinMaxOfLogitsBackward"} <= _grad_fns(x_mix) | _grad_fns(w_mix)
    assert not {"SoftmaxBackward0", "StackBackward0", "AbsBackward0"} & (_grad_fns(x_mix) | _grad_fns(w_mix))
    with native.disabled():
        x_ref, w_ref = layer.mixed_input_and_weight(x)
    assert "SoftmaxBackward0" in _grad_fns(x_ref)
    assert torch.equal(x_mix, x_ref) and torch.equal(w_mix, w_ref)

    model, layers = _supernet_layer(["search.quant.gumbel_tau=1.0"])
    model.train()(images)
    x_mix, _ = layers[1].mixed_input_and_weight(x)
    assert "SoftmaxBackward0" in _grad_fns(x_mix) and "_MixedRangeOfParamsBackward" not in _grad_fns(x_mix)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bounds", [(-4.0, 3.0), (0.0, 15.0)], ids=["signed", "unsigned"])
def test_lsq_equals_the_plain_ops_on_several_chunks(per_channel, bounds):
    torch.manual_seed(2)
    x = torch.randn(SHAPE) * 2
    upstream = torch.randn(SHAPE)
    step = torch.rand(SHAPE[0], 1, 1, 1) * 0.5 + 0.1 if per_channel else torch.tensor([0.3])
    qn, qp = bounds
    grad_scale = 0.01

    def plain(a, s):
        return lsq_fake_quant(a, s, torch.tensor(qn), torch.tensor(qp), torch.tensor(grad_scale))

    (out, grads), (ref, ref_grads) = (_grads(lambda a, s: native.lsq(a, s, qn, qp, grad_scale), x, step, upstream=upstream),
                                      _grads(plain, x, step, upstream=upstream))
    assert torch.equal(out, ref)
    assert torch.allclose(grads[0], ref_grads[0], atol=1e-6)  # the plain ops multiply by s, then divide
    assert grads[1].shape == step.shape
    assert torch.allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)


def test_the_kernels_take_non_contiguous_inputs_and_refuse_a_second_derivative():
    torch.manual_seed(3)
    x = (torch.randn(6, 10, 9) * 2).transpose(1, 2).requires_grad_()
    out = native.lsq(x, torch.tensor([0.25], requires_grad=True), -8.0, 7.0, 0.1)
    assert torch.equal(out, lsq_fake_quant(x, torch.tensor([0.25]), torch.tensor(-8.0), torch.tensor(7.0), torch.tensor(0.1)))
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # Hessians: disable_fused_kernels first
        grad.sum().backward()


def test_fused_entry_points_take_the_c_kernels_on_the_cpu(monkeypatch):
    """fused_lsq and fused_mixed_learned_range run the C kernels for float32 CPU tensors, and the
    torch.compile versions for anything else (here: float64) or inside native.disabled()."""
    calls = []
    monkeypatch.setattr(native, "_LSQ", type("Spy", (), {"apply": staticmethod(lambda *a: calls.append("lsq") or a[0])}))
    monkeypatch.setattr(native, "_MixedRange", type("Spy", (), {"apply": staticmethod(lambda *a: calls.append("mix") or a[0])}))
    x = torch.rand(4, 8)
    fused_lsq(x, torch.tensor([0.1]), 0.0, 7.0, 0.1)
    fused_mixed_learned_range(x, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 2.0]), (3, 7), False)
    assert calls == ["lsq", "mix"]
    out = fused_lsq(x.double(), torch.tensor([0.1], dtype=torch.float64), 0.0, 7.0, 0.1)
    assert calls == ["lsq", "mix"] and out.dtype == torch.float64
    with native.disabled():  # switched off for an A/B in one process, then on again
        fused_lsq(x, torch.tensor([0.1]), 0.0, 7.0, 0.1)
    assert calls == ["lsq", "mix"]
    fused_lsq(x, torch.tensor([0.1]), 0.0, 7.0, 0.1)
    assert calls == ["lsq", "mix", "lsq"]


def test_the_library_is_built_once_per_source_and_cpu_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    cc = native._compiler()
    first = native._build(cc)
    assert first.is_file() and first.parent.parent == tmp_path / "mpq_quant_kernels"
    mtime = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert [p.name for p in first.parent.iterdir()] == ["libmpq_quant.so"]  # no temporary file left behind


def test_without_a_compiler_the_quantizers_fall_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="framework.quant.native"):
        assert not native.available() and not native.available()
    assert len([r for r in caplog.records if "no C compiler" in r.getMessage()]) == 1
    x = torch.rand(3, 4) * 2
    out = fused_lsq(x, torch.tensor([0.2]), 0.0, 7.0, 0.1)  # torch.compile's version (or eager)
    assert torch.allclose(out, lsq_fake_quant(x, torch.tensor([0.2]), torch.tensor(0.0), torch.tensor(7.0), torch.tensor(0.1)))


# -- inside the two-pass steps ------------------------------------------------------------------------

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def _search_step(fused: bool):
    scfg = compose_config("search", ["search=asga", f"search.quant.fused={str(fused).lower()}"]).search
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=3)
    layers = trace_layers(model, 16, 3)
    build_supernet(model, layers, scfg.quant)
    reference = float(sum(layer.macs * 36 for layer in layers))
    return model, SearchStep(model, scfg, 10, "linear", reference, torch.device("cpu"))


def test_an_asga_search_step_with_the_c_kernels_equals_the_eager_one():
    """Two ASGA steps (two passes each, weights perturbed in place between them) on the supernet:
    the C kernels' run and the eager ops' run end with the same weights, ranges and logits."""
    runs = []
    for fused in (True, False):
        model, step = _search_step(fused)
        losses = [float(step(_batch(i)).loss) for i in range(2)]
        runs.append((losses, dict(model.named_parameters())))
    (losses, params), (ref_losses, ref_params) = runs
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert torch.allclose(p, ref_params[name], rtol=1e-4, atol=1e-5), name


def test_a_sam_step_of_a_fixed_policy_model_with_the_c_kernels_equals_the_eager_one():
    qcfg = compose_config("finetune").quant
    torch.manual_seed(0)
    base = create_model("resnet8", num_classes=10, in_channels=3)
    layers = trace_layers(base, 16, 3)
    policy = {layer.name: (4, 4) for layer in layers}
    models = []
    for fused in (True, False):
        model = copy.deepcopy(base)
        quantize_model(model, policy, OmegaConf.merge(qcfg, {"fused": fused}), layers)
        models.append(model)
    images, labels = _batch(5)
    for model in models:
        model(images)  # LSQ's step sizes from the same first batch
    results = []
    for model in models:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        two_pass = TwoPassOptimizer(model, [opt], build_rule(compose_config("search", ["search=asga"]).search.sharpness))
        for i in range(2):
            x, y = _batch(i)
            two_pass.step(lambda x=x, y=y, model=model: _backward(model, x, y))
        results.append(dict(model.named_parameters()))
    fused_params, eager_params = results
    for name, p in fused_params.items():
        assert torch.allclose(p, eager_params[name], rtol=1e-4, atol=1e-5), name


def _backward(model: nn.Module, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss
