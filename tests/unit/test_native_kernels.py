"""What is particular to the native backend (framework/quant/native): the in-call softmax and ranges
of the supernet's mixes, non-contiguous inputs, the refused second derivative, the build (cached,
atomic) and what happens where it cannot build. Every backend's equality with the reference is in
test_kernel_backends.py."""

from __future__ import annotations

import logging

import pytest
import torch

from framework.errors import MPQError
from framework.models import create_model
from framework.quant import build_supernet, kernels, native, trace_layers
from framework.quant.compiled import lsq_fake_quant
from framework.quant.layers import SearchConv2d
from framework.quant.quantizers import mixed_minmax_weight
from framework.quant.reference import mixed_learned_range
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
    with Gumbel sampling (probabilities drawn in Python) or the reference backend, the separate ops."""
    images = _batch()[0]
    model, layers = _supernet_layer()
    model.train()(images)  # the first call fixes the activations' signs
    layer = layers[1]
    x = torch.rand(2, layer.in_channels, 8, 8)
    x_mix, w_mix = layer.mixed_input_and_weight(x)
    assert {"_MixedRangeOfParamsBackward", "_MixedMinMaxOfLogitsBackward"} <= _grad_fns(x_mix) | _grad_fns(w_mix)
    assert not {"SoftmaxBackward0", "StackBackward0", "AbsBackward0"} & (_grad_fns(x_mix) | _grad_fns(w_mix))
    with kernels.using("reference"):
        x_ref, w_ref = layer.mixed_input_and_weight(x)
    assert "SoftmaxBackward0" in _grad_fns(x_ref)
    assert torch.equal(x_mix, x_ref) and torch.equal(w_mix, w_ref)

    model, layers = _supernet_layer(["search.quant.gumbel_tau=1.0"])
    model.train()(images)
    x_mix, _ = layers[1].mixed_input_and_weight(x)
    assert "SoftmaxBackward0" in _grad_fns(x_mix) and "_MixedRangeOfParamsBackward" not in _grad_fns(x_mix)


def test_the_kernels_take_non_contiguous_inputs_and_refuse_a_second_derivative():
    torch.manual_seed(3)
    x = (torch.randn(6, 10, 9) * 2).transpose(1, 2).requires_grad_()
    out = native.lsq(x, torch.tensor([0.25], requires_grad=True), -8.0, 7.0, 0.1)
    assert torch.equal(out, lsq_fake_quant(x, torch.tensor([0.25]), torch.tensor(-8.0), torch.tensor(7.0), torch.tensor(0.1)))
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # Hessians: kernels.twice_differentiable()
        grad.sum().backward()


def test_the_library_is_built_once_per_source_and_cpu_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    cc = native._compiler()
    first = native._build(cc)
    assert first.is_file() and first.parent.parent == tmp_path / "mpq_quant_kernels"
    mtime = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == mtime  # cached: not rebuilt
    assert [p.name for p in first.parent.iterdir()] == ["libmpq_quant.so"]  # no temporary file left behind


def test_without_a_compiler_auto_takes_the_reference_and_native_is_refused(monkeypatch, caplog):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="framework.quant.native"):
        assert not native.available() and not native.available()
    assert len([r for r in caplog.records if "no C compiler" in r.getMessage()]) == 1
    assert kernels.resolve("auto", "cpu").name == "reference"
    with pytest.raises(MPQError, match=r"quant.kernels=native: the C kernels cannot be built here \(no C compiler"):
        kernels.resolve("native", "cpu")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
