"""How many of its codes the first layer's 8-bit input quantizer uses on a dataset, per LSQ
activation initialisation (`quant.act_init`): the step is initialised on one training batch of 128
normalised images, as fine-tuning does, then every test image is quantized and the distinct integer
codes counted (of 256).

    .venv/bin/python benchmarks/input_codes.py            # Fashion-MNIST
    .venv/bin/python benchmarks/input_codes.py data=mnist
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

from framework.data import build_dataset, build_loader
from framework.paths import CONF_DIR
from framework.quant.quantizers import ACT_INITS, LSQQuantizer, int_range


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "stage=evaluate"])
    torch.manual_seed(0)
    train = build_loader(build_dataset(cfg.data, "train", train_transforms=False), 128, True, cfg.data, seed=0)
    first = next(iter(train))[0]
    test = build_loader(build_dataset(cfg.data, "test"), 1000, False, cfg.data)
    for init in ACT_INITS:  # auto: mse at 8 bits
        q = LSQQuantizer(8, signed=None, activation=True, init=init)
        q(first)
        qn, qp = int_range(8, bool(q._signed))
        codes = torch.zeros(qp - qn + 1, dtype=torch.bool)
        clipped = total = 0
        for images, _ in test:
            v = torch.round(images / q.step)
            clipped += int(((v < qn) | (v > qp)).sum())
            total += v.numel()
            codes[(v.clamp(qn, qp) - qn).long().unique()] = True
        print(f"{cfg.data.name} act_init={init}: step {q.step.item():.5f}, {int(codes.sum())} of {qp - qn + 1} codes "
              f"used on {len(test.dataset)} test images, {100 * clipped / total:.3f} % of pixels clipped")


if __name__ == "__main__":
    main(sys.argv[1:])
