"""On one process, the DeepSpeed two-pass step is the single-process two-pass step; the target
training step splits a batch into accumulated micro-batches and keeps its two-pass state."""

import copy

import pytest
import torch
from torch import nn

from framework.dist.engine import batch_geometry, build_engine
from framework.dist.process_group import open_process_group
from framework.quant.convert import quantize_model
from framework.quant.cost import trace_layers
from framework.sharpness import ASGA, SAM, EngineTwoPass, TwoPassOptimizer
from framework.train.step import TargetStep
from tests.conftest import compose_config


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _quantized(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    layers = trace_layers(model, 8, 1)
    quantize_model(model, {layer.name: (4, 4) for layer in layers}, compose_config("finetune").quant, layers)
    model(torch.randn(8, 1, 8, 8))  # initialise the LSQ step sizes
    return model


@pytest.mark.parametrize("rule,saq_case", [(lambda: SAM(rho=0.05), None), (lambda: ASGA(rho=0.1), None),
                                           (lambda: SAM(rho=0.05), 3), (None, None)])
def test_engine_step_equals_the_local_step(rule, saq_case):
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    local_model = _quantized(1)
    engine_model = copy.deepcopy(local_model)
    criterion = nn.CrossEntropyLoss()

    local = TwoPassOptimizer(local_model, [torch.optim.SGD(local_model.parameters(), lr=0.1, momentum=0.9)],
                             rule() if rule else None, saq_case=saq_case)
    for x, y in data:
        def closure(x=x, y=y):
            loss = criterion(local_model(x), y)
            loss.backward()
            return loss
        local.step(closure)

    dist_cfg = compose_config("finetune", ["dist.precision=fp32"]).dist
    with open_process_group(torch.device("cpu")):
        optimizer = torch.optim.SGD(engine_model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        engine = build_engine(engine_model, optimizer, scheduler, batch_geometry(8, dist_cfg, 1), dist_cfg,
                              torch.device("cpu"), two_pass=rule is not None)
        two_pass = EngineTwoPass(engine, engine_model, rule() if rule else None, saq_case=saq_case)
        for x, y in data:
            two_pass.micro_step(lambda net, x=x, y=y: criterion(net(x), y))

    for (name, a), b in zip(local_model.state_dict().items(), engine_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    if rule is not None:
        assert local.rule.state() == pytest.approx(two_pass.rule.state())


class PlainNet(nn.Module):
    """No batch norm and no quantizer: the outputs of a half batch are those of the full batch (no
    rounding threshold to cross), and the mean of two half-batch gradients is the full-batch one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _engine(model: nn.Module, accumulation: int):
    dist_cfg = compose_config("finetune", ["dist.precision=fp32", f"dist.gradient_accumulation={accumulation}"]).dist
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    geometry = batch_geometry(8, dist_cfg, 1)
    return build_engine(model, optimizer, scheduler, geometry, dist_cfg, torch.device("cpu")), geometry


def test_target_step_accumulates_micro_batches_into_one_full_batch_step():
    torch.manual_seed(0)
    model = PlainNet()
    reference = copy.deepcopy(model)
    base = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    with open_process_group(torch.device("cpu")):
        engine, geometry = _engine(model, accumulation=2)
        assert (geometry.micro_batch, geometry.accumulation) == (4, 2)
        step = TargetStep(engine, model, None, geometry.micro_batch)
        for x, y in data:
            out = reference(x)
            loss = nn.functional.cross_entropy(out, y)
            base.zero_grad()
            loss.backward()
            base.step()
            result = step((x, y))
            assert float(result.loss) == pytest.approx(float(loss.detach()), rel=1e-6)  # the mean of the halves' losses
            torch.testing.assert_close(result.logits, out.detach(), rtol=1e-6, atol=1e-7)
            assert result.info == {}  # plain steps report no two-pass metrics
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert step.state_dict() == {"two_pass": {"step_count": 3, "rule": {}}}


def test_target_step_resumes_the_two_pass_state_of_an_existing_checkpoint():
    """`training.pt` keeps `{"two_pass": {"step_count", "rule"}}`; loading it restores ASGA's radius and
    the phase of the periodic variant (period 2: step 3 is a plain step, step 4 two-pass)."""
    model = _quantized(2)
    saved = {"two_pass": {"step_count": 3, "rule": {"rho": 0.2, "gap_ema": 0.05, "gap": 0.01}}}
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with open_process_group(torch.device("cpu")):
        engine, geometry = _engine(model, accumulation=1)
        step = TargetStep(engine, model, ASGA(rho=0.05), geometry.micro_batch, period=2)
        step.load_state_dict(saved)
        assert step.two_pass.rule.rho == 0.2 and step.two_pass.rule.gap_ema == 0.05
        assert "loss_perturbed" not in step((x, y)).info
        info = step((x, y)).info
    assert "loss_perturbed" in info and step.state_dict()["two_pass"]["step_count"] == 5
    assert info["gap_ema"] == pytest.approx(0.9 * 0.05 + 0.1 * info["gap"])  # the EMA went on from the saved one
