"""`mpq export` on a tiny fine-tuned checkpoint of every registered model, with a mixed policy:
the packed model rebuilt from model.safetensors alone and onnxruntime (optimisations off and
default) must compute what the framework computes. The matrix is slow (`make test-all`: a model
trained and exported per case); `mpq export` itself is smoke-tested in test_export_cli.py."""

from __future__ import annotations

import itertools

import onnx
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from framework.data import build_dataset, build_loader
from framework.export import read_packed
from framework.export.packing import packed_nbytes
from framework.models import available_models
from framework.policy import cost_at, make_policy
from framework.quant.convert import fixed_layer_names
from framework.quant.cost import float_parameter_count, trace_layers
from framework.stage import build_model, model_meta, quant_meta, quantize_with_policy
from framework.stages.export import run_export
from framework.train.checkpoint import save_checkpoint
from tests.conftest import compose_config

#: every registered model at a size that keeps the test quick: the CIFAR ResNets at Fashion-MNIST's 28
#: pixels, the ImageNet models with their ImageNet stems (max-pool, stride-2 first conv) at 32 pixels
MODELS = {
    "resnet8": (28, {}),
    "resnet20": (28, {}),
    "resnet18": (32, {"small_input": False}),
    "resnet50": (32, {"small_input": False}),
    "mobilenet_v2": (32, {"small_input": False}),
}
#: (w_bits, a_bits) handed out in turn to the searched layers after the first two, which get (4, 2) and
#: (2, 3): every width 2-8 as weight and as input. Most inputs stay at 4 bits or more: a network trained
#: for seconds has small margins, and 2-bit inputs everywhere would leave predictions to rounding noise
MIXED = [(8, 8), (3, 6), (6, 4), (2, 4), (8, 8), (4, 6), (6, 8), (5, 7), (8, 8), (7, 5)]
FIRST = [(4, 2), (2, 3)]


def test_every_registered_model_is_covered():
    assert set(MODELS) == set(available_models())


def train(model, batches, steps: int, lr: float) -> None:
    """`steps` of SGD, then the batch-norm statistics recomputed over 8 batches (a few dozen steps
    leave the running averages far from the weights' statistics)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _, (images, labels) in zip(range(steps), batches, strict=False):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    with torch.no_grad():
        for _, (images, _) in zip(range(8), batches, strict=False):
            model(images)
    for norm in norms:
        norm.momentum = 0.1


def finetuned_checkpoint(tmp_path, name: str, overrides: tuple[str, ...] = (), full_precision: str | None = None,
                         pretrain_steps: int = 40, steps: int = 10):
    """A quantized checkpoint of `name` under a mixed policy: `pretrain_steps` SGD steps in full precision,
    then `steps` of quantization-aware training on Fashion-MNIST, written as `mpq finetune` writes one.
    `full_precision` names a layer kept at 32/32; `quant.fixed_bits=32` in `overrides` keeps the first
    and last layers in full precision."""
    size, options = MODELS[name]
    option_args = [f"+model.options.{k}={str(v).lower()}" if k not in ("small_input",) else
                   f"model.options.{k}={str(v).lower()}" for k, v in options.items()]
    cfg = compose_config("finetune", [f"model={name}", f"data.input_size={size}", "data.fraction=0.05",
                                      *option_args, *overrides])
    meta = model_meta(cfg, 10)
    torch.manual_seed(0)
    model = build_model(meta)
    layers = trace_layers(model, size, 1)
    fixed_bits = int(cfg.quant.fixed_bits)
    fixed = fixed_layer_names(layers, fixed_bits)
    turns = itertools.chain(FIRST, itertools.cycle(MIXED))
    bits = {layer.name: (fixed_bits, fixed_bits) if layer.name in fixed else next(turns) for layer in layers}
    if full_precision:
        bits[full_precision] = (32, 32)
    policy = make_policy(name, layers, bits, fixed,
                         {"target": cost_at(layers, bits, float_parameter_count(model), size, 1)})
    data_cfg = cfg.data
    loader = build_loader(build_dataset(data_cfg, "train"), 64, True, data_cfg, seed=0)
    batches = (batch for _ in itertools.count() for batch in loader)
    train(model, batches, pretrain_steps, lr=0.01)  # full precision first, as mpq pretrain
    quantize_with_policy(model, policy, cfg.quant, layers)
    train(model, batches, steps, lr=0.01)  # then quantization-aware, as mpq finetune
    path = tmp_path / f"{name}_checkpoint"
    save_checkpoint(path, model, {"stage": "finetune", "model": meta,
                                  "data": {"name": "fashion_mnist", "input_size": size, "channels": 1},
                                  "quant": quant_meta(policy, cfg.quant)})
    return path, policy


def export(tmp_path, checkpoint, *overrides: str):
    cfg = compose_config("export", [f"checkpoint={checkpoint}", "data.test_fraction=0.05", "export.batch_size=250",
                                    "tracking.enabled=false", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "export")
    return run_export(cfg), tmp_path / "export"


def assert_parity(result):
    parity = result.extra["parity"]
    n = parity["images"]
    assert n == 500
    # the packed model is the framework's arithmetic: identical predictions and logits within half an
    # output step of the framework computed without float32 rounding
    packed = parity["packed"]
    assert packed["agreement_exact"] >= 0.999, packed
    if packed["max_diff_steps_exact"] is not None:
        assert packed["max_diff_steps_exact"] < 0.5, packed
    # onnxruntime computes in float32: the framework's predictions, or no further from the exact ones
    # than float32 rounding takes the framework's own evaluation (twice that, plus three images), or
    # no flip that float32's noise cannot explain (the tiny ResNet-50 is chaotic: onnxruntime agreed
    # with the exact predictions on 99.2 %, 98.6 %, 99.6 % and 98.6 % of 500 images in four runs)
    floor = 1 - parity["framework"]["agreement_exact"]
    for runtime in ("onnx_off", "onnx_default"):
        row = parity[runtime]
        flips, floor_flips = round((1 - row["agreement_exact"]) * n), round(floor * n)
        assert row["agreement"] >= 0.999 or flips <= 2 * floor_flips + 3 or row["flips_beyond_noise"] == 0, (runtime, row)
    # each layer, fed the framework's own input, computes the framework's output in every runtime
    layers = parity["layer_by_layer"]
    for name, row in layers["layers"].items():
        for runtime in ("packed", "onnx_off", "onnx_default"):
            if row["unit"] == "relative":  # a float layer
                assert row[runtime] < 1e-5, (name, runtime, row)
            else:  # half an output step plus float32's rounding bound of the layer's sums
                assert row[f"{runtime}_tolerance_used"] <= 1, (name, runtime, row)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_a_finetuned_checkpoint_exports_and_computes_what_the_framework_computes(tmp_path, name):
    checkpoint, policy = finetuned_checkpoint(tmp_path, name)
    result, run_dir = export(tmp_path, checkpoint)
    assert_parity(result)

    # model.safetensors alone: the policy, the layer table and weights packed at each layer's bits
    packed = read_packed(run_dir / "model.safetensors")
    assert packed.policy["layers"].keys() == policy.layers.keys()
    assert packed.model["name"] == name and packed.input["size"] == MODELS[name][0]
    for layer_name, layer in packed.graph.layers.items():
        w_bits = policy.layers[layer_name].w_bits
        assert layer.w_bits == w_bits
        if w_bits < 32:
            assert layer.codes.min() >= -(2 ** (w_bits - 1)) and layer.codes.max() <= 2 ** (w_bits - 1) - 1
    rows = {row["layer"]: row for row in result.extra["layers"]}
    assert {row["w_bits"] for row in rows.values()} >= {2, 3, 4, 6, 8}
    for row in rows.values():
        assert row["packed_bytes"] == packed_nbytes(row["params"], row["w_bits"])
    metrics = result.metrics
    assert metrics["packed_weight_bytes"] * 8 - metrics["policy_weight_bits"] < 8 * len(rows)
    assert metrics["safetensors_bytes"] < metrics["float32_bytes"] / 3
    onnx.checker.check_model(onnx.load(run_dir / "model.onnx"), full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, full_precision, opset", [
    # min-max weights and PACT inputs (signed grids symmetric, so always a Clip), one float layer, int2
    ("resnet8", ("quant.weight=minmax", "quant.activation=learned_range"), "layer2.0.conv2", 25),
    # float first and last layers (no output step), int8 containers only
    ("resnet20", ("quant.fixed_bits=32",), None, 13),
    # per-channel steps; 2-bit and 4-bit inputs after ReLU6 in the 8-bit container
    ("mobilenet_v2", ("quant.per_channel=true",), None, 25),
])
def test_other_quantizers_float_layers_and_opsets_export(tmp_path, name, overrides, full_precision, opset):
    checkpoint, policy = finetuned_checkpoint(tmp_path, name, overrides, full_precision)
    result, run_dir = export(tmp_path, checkpoint, f"export.opset={opset}")
    assert_parity(result)
    model = onnx.load(run_dir / "model.onnx")
    assert model.opset_import[0].version == opset
    rows = {row["layer"]: row for row in result.extra["layers"]}
    if full_precision:
        assert rows[full_precision]["onnx_weight"] == "float32" and rows[full_precision]["onnx_input"] == "float32"
    if "quant.fixed_bits=32" in overrides:
        assert result.extra["parity"]["packed"]["max_diff_steps"] is None  # a float classifier has no step
        assert {rows[n]["w_bits"] for n in (next(iter(rows)), list(rows)[-1])} == {32}
    types = {row["onnx_weight"] for row in rows.values()}
    assert ("int2" in types) == (opset == 25) and ("int4" in types) == (opset >= 21)
