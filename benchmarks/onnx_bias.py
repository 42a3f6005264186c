"""Where the bias goes in model.onnx: onnxruntime's optimisations against a Conv/Gemm's own bias input.

onnxruntime (1.32, from `ORT_ENABLE_BASIC` on) rewrites a QDQ `Conv`/`Gemm` whose float bias is its
third input: the bias is quantized to int32 at the scale `s_x * s_w` (rounded to the nearest output
step), which changes the layer's output by up to half a step, and later quantizers carry that on.
`mpq export` therefore writes the bias as a separate float `Add`. This script measures both layouts
on an exported model: it rebuilds the graph from `model.safetensors`, writes it twice
(`bias="node"`, `bias="add"`, framework.export.onnx_model.build_onnx), and runs each in onnxruntime
with optimisations off and at the default level on the first `--images` test images of the file's
dataset. Reported per layout: the largest logit difference between the two levels in output steps of
the last layer, and the share of images whose logits stay within half a step (1.0: the levels agree).

    .venv/bin/python benchmarks/onnx_bias.py --packed outputs/pipeline/<run>/export/model.safetensors [--images 1000]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from hydra import compose, initialize_config_dir

from framework.data import build_dataset, build_loader
from framework.export import read_packed
from framework.export.onnx_model import build_onnx
from framework.export.parity import layer_step, onnx_sessions
from framework.paths import CONF_DIR
from framework.stage import Geometry, data_config_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", required=True, help="a model.safetensors written by mpq export")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--opset", type=int, default=21)
    args = parser.parse_args()

    packed = read_packed(args.packed)
    spec = packed.input
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={spec['dataset']}", "stage=evaluate"])
    data_cfg = data_config_at(cfg.data, Geometry(int(spec["size"]), int(spec["channels"])))
    loader = build_loader(build_dataset(data_cfg, "test"), 250, False, data_cfg)
    images = np.concatenate([x.numpy() for x, _ in itertools.islice(loader, -(-args.images // 250))])[: args.images]
    step = layer_step(packed.graph.last_layer())
    print(f"{packed.model['name']} ({args.packed}), {len(images)} test images, opset {args.opset}")
    for layout in ("node", "add"):
        model = build_onnx(packed.graph, args.opset, spec, {}, bias=layout)
        sessions = onnx_sessions(model.SerializeToString())
        off, default = (sessions[key].run(None, {"input": images})[0].astype(np.float64)
                        for key in ("onnx_off", "onnx_default"))
        in_steps = np.abs(default - off) / step
        print(f"  bias={layout:<5} default vs off: largest difference {in_steps.max():.3g} output steps, "
              f"{100 * (in_steps.max(axis=1) < 0.5).mean():.2f}% of images within half a step, "
              f"{100 * (default.argmax(1) == off.argmax(1)).mean():.2f}% same predictions")


if __name__ == "__main__":
    main()
