"""`mpq export` as a user runs it: the artifacts of a fine-tuned checkpoint (the export's smoke run, in
a subprocess), the onnxruntime example of docs/export.md on them, `mpq evaluate` of the packed file, and one
clear error line for each bad input (the command called in-process: they end before any export)."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap

import pytest

from framework.paths import REPO_ROOT
from tests.conftest import (
    assert_one_error_line,
    read_json,
    run_mpq_in_process,
    run_stage,
    run_stage_in_process,
)

FAST = ["data.test_fraction=0.05", "export.batch_size=250", "tracking.enabled=false"]


def docs_onnx_example() -> str:
    """The onnxruntime example of docs/export.md (the python block after its marker), which the README links."""
    text = (REPO_ROOT / "docs" / "export.md").read_text()
    match = re.search(r"<!-- export-onnx-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/export.md lost its onnxruntime example"
    return match.group(1)


@pytest.fixture(scope="module")
def exported(finetuned_checkpoint, tmp_path_factory):
    """`mpq export` of the session's fine-tuned checkpoint (uniform:4/4, LSQ on the default kernel backend)."""
    run_dir = tmp_path_factory.mktemp("export_cli") / "export"
    return run_dir, run_stage("export", run_dir, f"checkpoint={finetuned_checkpoint}", *FAST)


@pytest.mark.smoke
def test_export_writes_both_artifacts_and_the_docs_example_runs_them(exported, tmp_path):
    run_dir, result = exported
    metrics = result["metrics"]
    assert metrics["images"] == 500
    assert metrics["agreement"] >= 0.999
    for key in ("packed_top1", "onnx_top1", "onnx_default_top1"):  # top-1 moves only with the disagreements
        assert abs(metrics[key] - metrics["framework_top1"]) <= (1 - metrics["agreement"]) + 1e-12
    # uniform:4/4 with 8-bit first and last layers: the packed weights are the policy's bits, to the byte
    assert 0 <= metrics["packed_weight_bytes"] * 8 - metrics["policy_weight_bits"] < 8 * len(result["layers"])
    report = read_json(run_dir / "export.json")
    assert report["parity_passed"] and report["problems"] == []
    assert all(value <= 1 for value in report["parity"]["layer_by_layer"]["max_tolerance_used"].values())
    for name in ("model.safetensors", "model.onnx", "export.json", "policy.json"):
        assert (run_dir / name).is_file()

    # the five lines of plain Python of docs/export.md run the exported model
    code = docs_onnx_example().replace("outputs/export/<run>/model.onnx", str(run_dir / "model.onnx"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/export.md example", "exec"), {})
    predictions = out.getvalue().split()
    assert len(predictions) >= 1 and all(p.strip("[],").isdigit() for p in predictions if p.strip("[],"))

    # mpq evaluate scores the packed file alone, as the framework scores the checkpoint
    evaluated = run_stage_in_process("evaluate", tmp_path / "evaluate", f"checkpoint={run_dir / 'model.safetensors'}",
                                     "data.test_fraction=0.05", "tracking.enabled=false")
    assert evaluated["metrics"]["samples"] == 500
    assert abs(evaluated["metrics"]["top1"] - metrics["packed_top1"]) < 1e-12


def test_a_full_precision_checkpoint_without_a_policy_is_one_error(pretrained_checkpoint, tmp_path):
    proc = run_mpq_in_process("export", f"checkpoint={pretrained_checkpoint}", f"hydra.run.dir={tmp_path}", *FAST)
    assert_one_error_line(proc, "export", "holds no quantization policy", "policy=", run_dir=tmp_path)


def test_a_policy_that_does_not_match_the_checkpoint_is_one_error(finetuned_checkpoint, tmp_path):
    proc = run_mpq_in_process("export", f"checkpoint={finetuned_checkpoint}", "policy=uniform:2/2",
                              f"hydra.run.dir={tmp_path}", *FAST)
    assert_one_error_line(proc, "export", "does not match checkpoint", "W4/A4 in the checkpoint and W2/A2",
                          run_dir=tmp_path)


def test_a_corrupt_or_truncated_packed_file_is_one_error(exported, tmp_path):
    run_dir, _ = exported
    data = (run_dir / "model.safetensors").read_bytes()
    truncated, flipped = tmp_path / "truncated.safetensors", tmp_path / "flipped.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    flipped.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    for path in (truncated, flipped):
        proc = run_mpq_in_process("evaluate", f"checkpoint={path}", f"hydra.run.dir={tmp_path / path.stem}",
                                  "tracking.enabled=false")
        assert_one_error_line(proc, "evaluate", str(path), "corrupt or truncated", "re-run `mpq export`",
                              run_dir=tmp_path / path.stem)


CUSTOM_MODEL = '''
from torch import nn
from framework.models.registry import register_model


class GeluNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


@register_model("gelu_net")
def gelu_net(num_classes=10, in_channels=1):
    return GeluNet(num_classes, in_channels)
'''

def _save_quantized_gelu_checkpoint(path) -> None:
    """A W4/A4 checkpoint of the registered gelu_net, its quantizers initialised on one batch."""
    import torch

    from framework.policy import cost_at, make_policy
    from framework.quant.cost import float_parameter_count, trace_layers
    from framework.stage import build_model, quant_meta, quantize_with_policy
    from framework.train.checkpoint import save_checkpoint
    from tests.conftest import compose_config

    cfg = compose_config("finetune")
    meta = {"name": "gelu_net", "num_classes": 10, "in_channels": 1, "options": {}}
    model = build_model(meta)
    layers = trace_layers(model, 28, 1)
    bits = {layer.name: (4, 4) for layer in layers}
    policy = make_policy("gelu_net", layers, bits, set(), {"target": cost_at(layers, bits, float_parameter_count(model), 28, 1)})
    quantize_with_policy(model, policy, cfg.quant, layers)
    model.train()
    model(torch.randn(8, 1, 28, 28))
    save_checkpoint(path, model.eval(), {"stage": "finetune", "model": meta,
                    "data": {"name": "fashion_mnist", "input_size": 28, "channels": 1}, "quant": quant_meta(policy, cfg.quant)})


def test_an_unsupported_layer_is_one_error_naming_it(tmp_path, monkeypatch):
    """A model of the user's own (registered by their script, which then calls the `mpq` command's
    `main`, as this test does in-process) with a layer the export does not know."""
    from framework.models.registry import MODELS

    monkeypatch.setitem(MODELS, "gelu_net", None)  # registered by the script below; unregistered after the test
    exec(compile(textwrap.dedent(CUSTOM_MODEL), "custom_model.py", "exec"), {"__name__": "custom_model"})
    checkpoint = tmp_path / "checkpoint"
    _save_quantized_gelu_checkpoint(checkpoint)
    run_dir = tmp_path / "export"
    proc = run_mpq_in_process("export", f"checkpoint={checkpoint}", f"hydra.run.dir={run_dir}", *FAST)
    assert_one_error_line(proc, "export", "cannot export layer 'act' (GELU)", "supported are", run_dir=run_dir)
