"""The GPU path (marked `gpu`, skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine).

The CUDA counterparts of CPU tests:

- the compiled kernel backend (framework/quant/compiled.py) against the reference ops, forward and
  gradients, compiled for CUDA (not run eagerly), ties on the bounds included
  (tests/unit/test_kernel_backends.py);
- the FFCV loader's transfer to the device: the same batches as the torch loader, on the GPU
  (tests/unit/test_ffcv.py);
- training through DeepSpeed in bf16 and fp16 (`dist.precision`), a quantized model with ASGA;
- two-pass steps on CUDA: the DeepSpeed two-pass step equals the single-process one
  (tests/unit/test_engine_two_pass.py), and the search step of ASGA, plain and periodic.

Run them in a process of their own (`pytest -m gpu tests/gpu`): the process group and DeepSpeed's
accelerator are chosen once per process, so CPU tests run first in the same process would keep them
on the CPU (the DeepSpeed tests skip themselves then).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from tests.conftest import compose_config, make_image_tree
from tests.unit.test_engine_two_pass import _quantized as _quantized_on_cpu
from tests.unit.test_ffcv import _with, fmnist  # noqa: F401 (the CPU tests' Fashion-MNIST beton fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture
def deterministic():
    """cuDNN's deterministic algorithms, so two runs of the same operations give the same bits."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _skip_if_deepspeed_is_on_the_cpu() -> None:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        pytest.skip("a CPU DeepSpeed engine was built earlier in this process; run tests/gpu on their own")


def _assert_compiled(kernel) -> None:
    """The compiled kernel was compiled for CUDA, not run eagerly after an error."""
    assert kernel.failure is None and kernel.compiled is not None, f"{kernel.fn.__name__} ran eagerly on CUDA: {kernel.failure}"


# -- the kernel backends on CUDA --------------------------------------------------------------------------

def _on_cuda(backend: str, fn, *tensors, upstream):
    from framework.quant import kernels

    leaves = [t.detach().clone().to(CUDA).requires_grad_() for t in tensors]
    with kernels.using(backend, CUDA):
        out = fn(kernels.active(), *leaves)
        (out * upstream.to(CUDA)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def test_auto_takes_the_compiled_backend_on_cuda():
    from framework.quant import kernels

    assert kernels.resolve("auto", CUDA).name == "compiled"


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_channel,bounds", [(False, (-4, 3)), (True, (-4, 3)), (False, (0, 15))])
def test_the_compiled_lsq_on_cuda_equals_the_reference(per_channel, bounds, ties):
    from framework.quant import compiled
    from tests.unit.test_kernel_backends import SHAPE, _lsq_inputs

    x, step = _lsq_inputs(bounds, per_channel, ties)
    upstream = torch.randn(SHAPE)
    qn, qp = bounds
    (out, grads), (ref, ref_grads) = (_on_cuda(b, lambda k, a, s: k.lsq(a, s, qn, qp, 0.01), x, step, upstream=upstream)
                                      for b in ("compiled", "reference"))
    _assert_compiled(compiled.compiled_lsq)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_the_compiled_mixed_activation_on_cuda_equals_the_reference(signed):
    from framework.quant import compiled
    from tests.unit.test_kernel_backends import SHAPE, _range_inputs

    ranges = torch.tensor([1.0, 1.5, 2.5, 4.0])
    levels = (1, 3, 7, 31) if signed else (3, 7, 15, 63)
    x = _range_inputs(signed, ranges, levels, ties=True)
    upstream = torch.randn(SHAPE)
    (out, grads), (ref, ref_grads) = (
        _on_cuda(b, lambda k, a, p, r: k.mixed_learned_range(a, p, r, levels, signed), x,
                 torch.tensor([0.1, 0.2, 0.3, 0.4]), ranges, upstream=upstream) for b in ("compiled", "reference"))
    _assert_compiled(compiled.compiled_mixed_learned_range)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=0, atol=1e-5)
    for g, want in zip(grads[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-3)


# -- the FFCV loader's device transfer ------------------------------------------------------------------

def test_ffcv_loader_delivers_the_torch_loaders_batches_on_the_gpu(fmnist):  # noqa: F811
    """Raw digits, evaluation and (un-augmented) training with accumulation: the same labels and
    pixels as the torch loader's CPU batches, already on the current CUDA device."""
    from framework.data import build_dataset, build_loader

    dataset = build_dataset(fmnist, "test", train_transforms=False)
    for train, kwargs in ((False, {}), (True, {"seed": 3, "accumulation": 2})):
        ours = build_loader(dataset, 32, train, _with(fmnist, loader="ffcv"), **kwargs)
        theirs = build_loader(dataset, 32, train, _with(fmnist, loader="torch"), **kwargs)
        if train:
            for loader in (ours, theirs):
                loader.sampler.set_epoch(2, start=64)
        batches = 0
        for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
            assert x.device.type == y.device.type == "cuda" and x.device.index == torch.cuda.current_device()
            assert x.dtype == tx.dtype and y.dtype == ty.dtype == torch.int64
            assert torch.equal(y.cpu(), ty)
            torch.testing.assert_close(x.cpu(), tx, rtol=0, atol=1e-6)
            batches += 1
        assert batches == len(theirs) > 0


def test_ffcv_photos_are_normalised_on_the_gpu_as_on_the_cpu(tmp_path, monkeypatch):
    """RGB photos: on CUDA the batches are normalised on the device (ToModelInput), on the CPU
    inside FFCV's compiled stage (NormalizeImage); both give the same tensors."""
    import framework.data.ffcv_loader as ffcv_loader
    from framework.data import build_dataset, build_loader
    from framework.data.beton import write_beton

    root = make_image_tree(tmp_path / "tree", per_class=6, size=(48, 40), suffix=".png")
    cfg = compose_config("pretrain", ["data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}",
                                      "data.ffcv.write.mode=raw", "data.ffcv.write.max_resolution=null",
                                      "data.ffcv.write.workers=1", "data.input_size=32", "data.loader=ffcv"]).data
    write_beton(cfg, "train")
    dataset = build_dataset(cfg, "train", train_transforms=False)
    on_gpu = [(x, y) for x, y in build_loader(dataset, 8, False, cfg)]
    monkeypatch.setattr(ffcv_loader, "_device", lambda: None)
    on_cpu = [(x.clone(), y) for x, y in build_loader(dataset, 8, False, cfg)]
    assert len(on_gpu) == len(on_cpu) > 0
    for (x, y), (cx, cy) in zip(on_gpu, on_cpu, strict=True):
        assert x.is_cuda and y.is_cuda and not cx.is_cuda
        assert torch.equal(y.cpu(), cy)
        torch.testing.assert_close(x.cpu(), cx, rtol=0, atol=1e-5)


# -- DeepSpeed in half precision, two-pass steps --------------------------------------------------------

def _quantized(seed: int) -> nn.Module:
    """The CPU tests' Net under LSQ 4/4 (conf/quant/lsq.yaml), initialised, on the GPU."""
    return _quantized_on_cpu(seed).to(CUDA)


def _engine(model: nn.Module, precision: str, two_pass: bool = True):
    from framework.dist.engine import batch_geometry, build_engine

    dist_cfg = compose_config("finetune", [f"dist.precision={precision}"]).dist
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    geometry = batch_geometry(8, dist_cfg, 1)
    return build_engine(model, optimizer, scheduler, geometry, dist_cfg, CUDA, two_pass=two_pass), geometry


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_trains_a_quantized_model_in_half_precision(precision):
    """`dist.precision=bf16|fp16` on CUDA: the engine runs in that precision, ASGA's two-pass steps
    take finite losses and move the weights (fp16: DeepSpeed's dynamic loss scale may skip the first
    steps on overflow), and the first loss is the fp32 model's within half-precision rounding."""
    from framework.dist.process_group import open_process_group
    from framework.sharpness import ASGA
    from framework.train.step import TargetStep

    _skip_if_deepspeed_is_on_the_cpu()
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = _quantized(1)
    reference = copy.deepcopy(model)  # fp32, before the engine converts `model`
    before = {name: p.detach().float().clone() for name, p in reference.named_parameters()}
    data = [(torch.randn(8, 1, 8, 8, device=CUDA), torch.randint(0, 3, (8,), device=CUDA)) for _ in range(8)]
    with torch.no_grad():  # the first step's first pass: training mode, at the initial weights
        first_loss_fp32 = float(nn.functional.cross_entropy(reference(data[0][0]), data[0][1]))
    with open_process_group(CUDA):
        engine, geometry = _engine(model, precision)
        step = TargetStep(engine, model, ASGA(rho=0.1), geometry.micro_batch)
        assert step.dtype == dtype
        assert next(p for p in model.parameters() if p.is_floating_point()).dtype == dtype
        outputs = [step(batch) for batch in data]
    losses = [float(out.loss) for out in outputs]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert all(torch.isfinite(out.logits).all() for out in outputs)
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[name].detach().float(), value) for name, value in before.items()), \
        "no parameter moved in 8 steps"
    assert losses[0] == pytest.approx(first_loss_fp32, rel=0.05)


@pytest.mark.parametrize("rule_name", ["sam", "asga", None])
def test_engine_two_pass_step_on_cuda_equals_the_local_step(rule_name, deterministic):
    """tests/unit/test_engine_two_pass.py on CUDA (fp32): the DeepSpeed two-pass step is the
    single-process one, weights and rule state."""
    from framework.dist.process_group import open_process_group
    from framework.sharpness import ASGA, SAM, EngineTwoPass, TwoPassOptimizer

    _skip_if_deepspeed_is_on_the_cpu()
    rule = {"sam": lambda: SAM(rho=0.05), "asga": lambda: ASGA(rho=0.1), None: None}[rule_name]
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8, device=CUDA), torch.randint(0, 3, (8,), device=CUDA)) for _ in range(3)]
    local_model = _quantized(1)
    engine_model = copy.deepcopy(local_model)
    criterion = nn.CrossEntropyLoss()

    local = TwoPassOptimizer(local_model, [torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)],
                             rule() if rule else None)
    for x, y in data:
        def closure(x=x, y=y):
            loss = criterion(local_model(x), y)
            loss.backward()
            return loss
        local.step(closure)

    with open_process_group(CUDA):
        engine, _ = _engine(engine_model, "fp32", two_pass=rule is not None)
        two_pass = EngineTwoPass(engine, engine_model, rule() if rule else None)
        for x, y in data:
            two_pass.micro_step(lambda net, x=x, y=y: criterion(net(x), y))

    for (name, a), b in zip(local_model.state_dict().items(), engine_model.state_dict().values(), strict=True):
        assert a.device.type == b.device.type == "cuda", name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if rule is not None:
        assert local.rule.state() == pytest.approx(two_pass.rule.state(), nan_ok=True)


@pytest.mark.parametrize("period", [1, 2])
def test_asga_search_step_on_cuda(period):
    """The proxy search's two-pass step (ASGA, every step or every 2nd) on a CUDA supernet: finite
    losses, the second pass exactly on the two-pass steps, weights and bit logits moved, and the
    first loss that of the same supernet on the CPU."""
    from framework.models import create_model
    from framework.quant import build_supernet, trace_layers
    from framework.search.step import LOGITS, SearchStep

    scfg = compose_config("search", ["search=asga"]).search
    with open_dict(scfg):
        scfg.sharpness.period = period
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 28, 1)
    build_supernet(model, layers, scfg.quant)
    cpu_model = copy.deepcopy(model)
    model.to(CUDA)
    reference = float(sum(layer.macs * 36 for layer in layers))
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(4)]
    logits_before = [p.detach().clone() for n, p in model.named_parameters() if n.endswith(LOGITS)]

    step = SearchStep(model, scfg, 10, "linear", reference, CUDA)
    outputs = [step((x.to(CUDA), y.to(CUDA))) for x, y in batches]
    cpu_first = SearchStep(cpu_model, scfg, 10, "linear", reference, torch.device("cpu"))(batches[0])

    assert all(math.isfinite(float(out.loss)) and out.logits.is_cuda for out in outputs)
    for i, out in enumerate(outputs):
        assert ("loss_perturbed" in out.info) == (i % period == 0), (i, sorted(out.info))
    assert step.two_pass.step_count == len(batches)
    logits_after = [p.detach() for n, p in model.named_parameters() if n.endswith(LOGITS)]
    assert logits_after and any(not torch.equal(a, b) for a, b in zip(logits_after, logits_before, strict=True))
    assert float(outputs[0].loss) == pytest.approx(float(cpu_first.loss), rel=1e-2)
