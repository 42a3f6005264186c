"""The search step's budget multiplier (search.complexity.mode): projected (C <= B) or free (C = B)."""

import pytest
import torch

from framework.models import create_model
from framework.quant import build_supernet, expected_bitops, trace_layers
from framework.search.step import SearchStep
from tests.conftest import compose_config


def _step(mode: str, budget_scale: float):
    scfg = compose_config("search", ["search=dnas", f"search.complexity.mode={mode}", "search.complexity.dual_lr=2.0",
                                     "search.lr_logits=0.0", "search.lr_weights=0.0"]).search
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 16, 1)
    build_supernet(model, layers, scfg.quant)
    with torch.no_grad():
        budget = float(expected_bitops(model)) * budget_scale  # uniform logits: E[BitOps] is known before a step
    return SearchStep(model, scfg, 10, "hinge", budget, torch.device("cpu"), budget=budget), budget


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.mark.parametrize("mode", ["dual", "dual_target"])
def test_the_multiplier_follows_the_violation_and_only_dual_target_goes_negative(mode):
    """lr 0 keeps E[BitOps] fixed, so lambda after n steps is n * eta * (C / B - 1), projected at 0 for `dual`."""
    over, budget = _step(mode, budget_scale=0.5)  # C = 2 B: violation +1 per step
    for _ in range(3):
        over(_batch())
    assert over.multiplier == pytest.approx(3 * 2.0 * 1.0, rel=1e-5)
    under, _ = _step(mode, budget_scale=2.0)  # C = B / 2: violation -0.5 per step
    for _ in range(3):
        under(_batch())
    assert under.multiplier == pytest.approx(0.0 if mode == "dual" else -3.0, abs=1e-5)
    assert under.last_terms["lambda"] == under.multiplier
