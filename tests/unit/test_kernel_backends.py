"""The quantizers' kernel seam (framework.quant.kernels): every backend equals the reference
implementation, forward to the bit and gradients to float tolerance, on random inputs and on inputs
built exactly on the clipping bounds and half-way points; inside the two-pass steps too; one option
chooses the backend, and the native kernels give the same bits at any thread count."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.config.validate import validate_config
from framework.errors import MPQError
from framework.models import create_model
from framework.quant import build_supernet, kernels, native, quantize_model, reference, trace_layers
from framework.search.step import SearchStep
from framework.sharpness import TwoPassOptimizer, build_rule
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[2]
# `compiled` is torch.compile: a cold Inductor compile per kernel variant (minutes on 2 cores), so its
# cases are slow (`make test-all`); the native kernels build once per machine and are cached.
ACCELERATED = [pytest.param("compiled", marks=[pytest.mark.slow, pytest.mark.compile]),
               pytest.param("native", marks=pytest.mark.skipif(
                   not native.available(), reason="the C kernels do not build here (no C compiler)"))]
# several 2048-element chunks and a ragged end: both threads and the scalar tails of the C kernels
SHAPE = (5, 7, 13, 17)


def _run(backend: str, fn, *tensors, upstream):
    """`fn(backend, *leaves)`, its output and the gradients of `(out * upstream).sum()` for every leaf."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with kernels.using(backend):
        out = fn(kernels.active(), *leaves)
        (out * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def _assert_equal_to_reference(backend, fn, *tensors, upstream, rtol=1e-4, atol=1e-5):
    out, grads = _run(backend, fn, *tensors, upstream=upstream)
    ref, ref_grads = _run("reference", fn, *tensors, upstream=upstream)
    assert torch.equal(out, ref), f"{backend}: the forward differs from the reference"
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"{backend}: gradient {i}")
    return grads, ref_grads


def _lsq_inputs(bounds, per_channel, ties):
    torch.manual_seed(2)
    qn, qp = bounds
    step = 2.0 ** -torch.randint(2, 5, (SHAPE[0], 1, 1, 1)).float() if per_channel else torch.tensor([0.25])
    x = torch.randn(SHAPE) * 2
    if ties:  # exact multiples of the (power-of-two) step: on Qn, on Qp, half-way points, just outside
        codes = torch.tensor([qn, qp, qn + 0.5, qp - 0.5, 0.5, 1.5, -0.5 if qn < 0 else 2.5, qn - 1, qp + 1])
        picks = codes[torch.randint(0, len(codes), SHAPE)]
        x = torch.where(torch.rand(SHAPE) < 0.6, picks * step.expand(SHAPE), x)
    return x, step


@pytest.mark.parametrize("backend", ACCELERATED)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("bounds", [(-4, 3), (0, 15)], ids=["signed", "unsigned"])
def test_lsq_of_every_backend_equals_the_reference(backend, bounds, per_channel, ties):
    x, step = _lsq_inputs(bounds, per_channel, ties)
    upstream = torch.randn(SHAPE)
    qn, qp = bounds
    grads, ref_grads = _assert_equal_to_reference(
        backend, lambda b, a, s: b.lsq(a, s, qn, qp, 0.01), x, step, upstream=upstream)
    if ties:  # on a bound the whole gradient passes (the reference's rule), in every backend
        on_bound = (x / step == qn) | (x / step == qp)
        assert on_bound.any()
        assert torch.equal(grads[0][on_bound], upstream[on_bound])


def test_lsq_reference_gradients_on_the_bounds_and_half_way_points_in_closed_form():
    """dq/dx = 1 and dq/ds = round(v) - v on Qn <= v <= Qp (0 on a bound); Qn, Qp outside; ties to even."""
    step = torch.tensor([0.5], requires_grad=True)
    v = torch.tensor([-4.0, 3.0, -5.0, 4.0, 0.5, 1.5, 2.5, -0.5])
    x = (v * 0.5).requires_grad_()
    q = reference.lsq(x, step, -4, 3, 1.0)
    assert q.tolist() == [-2.0, 1.5, -2.0, 1.5, 0.0, 1.0, 1.0, 0.0]  # half-way points round to even
    q.sum().backward()
    assert x.grad.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    expected = [0.0, 0.0, -4.0, 3.0, -0.5, 0.5, -0.5, 0.5]
    assert step.grad.item() == pytest.approx(sum(expected))


def _range_inputs(signed, ranges, levels, ties):
    torch.manual_seed(1)
    x = torch.randn(SHAPE) * 3
    x = x if signed else x.relu()
    if ties:  # on a range, on -range, at 0 and half-way between levels of the first candidate
        r0, s0 = float(ranges[0]), float(ranges[0]) / levels[0]
        values = torch.tensor([r0, -r0 if signed else 0.0, 0.0, 0.5 * s0, 1.5 * s0, r0 - 0.5 * s0])
        x = torch.where(torch.rand(SHAPE) < 0.5, values[torch.randint(0, len(values), SHAPE)], x)
    return x


@pytest.mark.parametrize("backend", ACCELERATED)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("k", [1, 4, 5], ids=["1-candidate", "4-candidates", "5-candidates"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_the_mixed_activation_of_every_backend_equals_the_reference(backend, signed, k, ties):
    ranges = torch.tensor([1.0, 1.5, 2.5, 4.0, 3.0])[:k]  # a power of two first: exact half-way points
    levels = ((1, 3, 7, 31, 127) if signed else (3, 7, 15, 63, 255))[:k]
    probs = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])[:k]
    x = _range_inputs(signed, ranges, levels, ties)
    _assert_equal_to_reference(backend, lambda b, a, p, r: b.mixed_learned_range(a, p, r, levels, signed),
                               x, probs, ranges, upstream=torch.randn(SHAPE), rtol=1e-4, atol=1e-3)
    logits = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.0])[:k]
    rhos = [torch.tensor(float(v)) for v in ranges]
    _assert_equal_to_reference(
        backend, lambda b, a, lg, *rh: b.mixed_learned_range_of_params(a, lg, list(rh), levels, signed),
        x, logits, *rhos, upstream=torch.randn(SHAPE), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ACCELERATED)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_single_learned_range_of_every_backend_equals_the_reference(backend, signed):
    x = _range_inputs(signed, torch.tensor([2.0]), (7,), ties=True)
    _assert_equal_to_reference(backend, lambda b, a, rho: b.learned_range(a, rho, 7, signed),
                               x, torch.tensor(-2.0), upstream=torch.randn(SHAPE), atol=1e-3)


@pytest.mark.parametrize("backend", ACCELERATED)
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 7), SHAPE])
def test_the_min_max_weight_mix_of_every_backend_equals_the_reference(backend, shape):
    torch.manual_seed(len(shape))
    w = torch.randn(shape)
    w.view(-1)[0] = -w.abs().max()  # the largest magnitude negative: on -Qp exactly
    qps = torch.tensor([1.0, 3.0, 7.0, 31.0])
    logits = torch.randn(4)
    upstream = torch.randn(shape)
    _assert_equal_to_reference(backend, lambda b, a, p: b.mixed_minmax(a, p, qps), w, logits.softmax(0),
                               upstream=upstream)
    _assert_equal_to_reference(backend, lambda b, a, lg: b.mixed_minmax_of_logits(a, lg, qps), w, logits,
                               upstream=upstream)


# -- choosing the backend ------------------------------------------------------------------------------

def test_auto_resolves_to_the_fastest_tested_backend_of_the_device():
    assert kernels.resolve("auto", "cpu").name == ("native" if native.available() else "reference")
    assert kernels.resolve("auto", "cuda").name == "compiled"
    assert kernels.resolve("reference", "cuda").name == "reference"


def test_a_backend_that_cannot_run_is_refused_in_one_line():
    with pytest.raises(MPQError, match=r"quant.kernels=native: the C kernels run on the CPU.*use quant.kernels=auto"):
        kernels.resolve("native", "cuda")
    with pytest.raises(MPQError, match="quant.kernels=fast is not a kernel backend; choose one of auto, reference"):
        kernels.resolve("fast")


def test_the_option_is_validated_and_the_search_follows_it():
    cfg = compose_config("finetune", ["quant.kernels=reference"])
    validate_config(cfg)
    assert cfg.quant.kernels == "reference" and cfg.search.quant.kernels == "reference"
    with pytest.raises(MPQError, match="quant.kernels.*fastest.*auto, reference, compiled, native"):
        validate_config(compose_config("finetune", ["quant.kernels=fastest"]))
    with pytest.raises(MPQError, match="one backend runs per process; set quant.kernels alone"):
        validate_config(compose_config("search", ["search.quant.kernels=reference", "quant.kernels=compiled"]))


def test_describe_names_the_backend_its_build_and_the_threads():
    with kernels.using("auto"):
        record = kernels.describe()
    assert record["requested"] == "auto" and record["backend"] == kernels.resolve("auto").name
    assert record["threads"] == torch.get_num_threads() and record["build_key"].startswith("torch-")
    if record["backend"] == "native":
        assert re.search(r"libmpq_quant-[0-9a-f]{16}$", record["build_key"])


def test_the_hessian_products_run_a_twice_differentiable_backend():
    with kernels.using("compiled"):
        with kernels.twice_differentiable() as backend:
            assert backend.name == "reference" and kernels.active() is backend
        assert kernels.active().name == "compiled"


def test_no_environment_variable_or_size_threshold_chooses_a_kernel():
    """One option chooses the backend: no code reads an environment variable about kernels or
    compares a tensor's size to pick one (the knobs the seam replaced)."""
    sources = [p for p in (REPO / "framework").rglob("*.py")] + list((REPO / "launchers").rglob("*.py"))
    offending = []
    for path in sources:
        text = path.read_text()
        for pattern in (r"MPQ_NATIVE_KERNELS", r"environ[^\n]*KERNEL", r"numel\(\)\s*>=\s*COMPILED",
                        r"COMPILED_MIN_ELEMENTS", r"disable_fused_kernels", r"\.fused\b", r"native\.disabled"):
            if re.search(pattern, text):
                offending.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offending, offending


# -- inside the two-pass steps ---------------------------------------------------------------------------

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("backend", ACCELERATED)
def test_an_asga_search_step_of_every_backend_equals_the_reference(backend):
    """Two ASGA steps (two passes each, weights perturbed in place between them) on the supernet."""
    runs = []
    for name in (backend, "reference"):
        scfg = compose_config("search", ["search=asga"]).search
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10, in_channels=3)
        layers = trace_layers(model, 16, 3)
        build_supernet(model, layers, scfg.quant)
        with kernels.using(name):
            step = SearchStep(model, scfg, 10, "linear", float(sum(la.macs * 36 for la in layers)), torch.device("cpu"))
            losses = [float(step(_batch(i)).loss) for i in range(2)]
        runs.append((losses, {k: v.detach().clone() for k, v in model.named_parameters()}))
    (losses, params), (ref_losses, ref_params) = runs
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)


def _backward(model: nn.Module, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _sam_steps(model, backend, steps=2):
    with kernels.using(backend):
        model(_batch(5)[0])  # LSQ's step sizes from the same first batch
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        two_pass = TwoPassOptimizer(model, [opt], build_rule(compose_config("search", ["search=asga"]).search.sharpness))
        for i in range(steps):
            x, y = _batch(i)
            two_pass.step(lambda x=x, y=y: _backward(model, x, y))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _fixed_policy_model():
    qcfg = compose_config("finetune").quant
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=3)
    layers = trace_layers(model, 16, 3)
    return quantize_model(model, {layer.name: (4, 4) for layer in layers}, qcfg, layers)


@pytest.mark.parametrize("backend", ACCELERATED)
def test_a_sam_step_of_a_fixed_policy_model_of_every_backend_equals_the_reference(backend):
    base = _fixed_policy_model()
    params, ref_params = _sam_steps(copy.deepcopy(base), backend), _sam_steps(copy.deepcopy(base), "reference")
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not native.available(), reason="the C kernels do not build here (no C compiler)")
def test_the_native_kernels_give_the_same_bits_at_any_thread_count():
    """The step, range and mixing-weight gradients are summed per chunk and added in chunk order: the
    same bits with 1, 2 and 3 threads, and on a repeat."""
    x, step = _lsq_inputs((-4, 3), False, ties=False)
    x = torch.cat([x.flatten()] * 20)  # ~155,000 elements: many chunks per thread
    upstream = torch.randn(x.shape)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            grads = _run("native", lambda b, a, s: b.lsq(a, s, -4, 3, 0.01), x, step, upstream=upstream)[1]
            mix = _run("native", lambda b, a, p, r: b.mixed_learned_range(a, p, r, (3, 7, 15), False),
                       x.relu(), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 2.0, 3.0]), upstream=upstream)[1]
            outs.append([grads[1], *mix[1:]])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


def test_old_configs_and_checkpoints_without_the_option_still_build(tmp_path):
    """A quantizer config written before `kernels` existed (with `fused`) still quantizes a model."""
    qcfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(compose_config("finetune").quant).items()
                             if k not in ("kernels", "act_init")})
    qcfg.fused = True
    model = create_model("resnet8", num_classes=10, in_channels=3)
    layers = trace_layers(model, 16, 3)
    quantize_model(model, {layer.name: (4, 4) for layer in layers}, qcfg, layers)
    assert model(_batch()[0]).shape == (8, 10)
