"""HAWQ's per-layer Hessian traces (framework.landscape.trace) against the exact Hessians of a small
network, the sign codes that decouple groups of blocks, the quantization errors and single-layer
loss increases of framework.landscape.sensitivity against their formulas, and `policy=hawq` /
`policy=sensitivity` resolved on a briefly trained ResNet-8 (framework.stage.policies)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from framework.config import validate_config
from framework.errors import MPQError
from framework.landscape import CrossEntropyOnBatches, hutchinson_traces, layer_traces, loss_value
from framework.landscape.sensitivity import hawq_sensitivity, loss_sensitivity
from framework.landscape.trace import sign_codes
from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import quantize_model
from framework.stage.policies import Geometry, Reference, resolve_policy
from tests.conftest import compose_config

LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
#: how many standard errors an estimate may be from the truth: a normal deviate beyond 4 has
#: probability 6e-5, so with the few blocks tested here a correct estimator fails about 1 run in 4000
Z = 4.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread (a thread pool only waits on a shared machine's busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed=0, channels=4, size=6):
    """conv -> batch norm (eval statistics that are not the defaults) -> tanh -> linear, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.Tanh(), nn.Flatten(),
                          nn.Linear(channels * size * size, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    return model.double()


def trained(model, batches, steps=60, lr=0.1):
    """`model` after `steps` steps of gradient descent on the mean loss over `batches` (eval mode)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.eval()
    for _ in range(steps):
        optimizer.zero_grad()
        mean_loss(model, batches).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def random_batches(seed=0, count=2, size=6, shape=(1, 6, 6), classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (size,), generator=g))
            for _ in range(count)]


def mean_loss(model, batches, hooks=None):
    """The mean cross-entropy over every sample of `batches` (the loss the traces are of)."""
    samples = sum(len(y) for _, y in batches)
    total = 0.0
    for b, (x, y) in enumerate(batches):
        handles = [model.get_submodule(name).register_forward_pre_hook(hook(b)) for name, hook in (hooks or {}).items()]
        try:
            total = total + F.cross_entropy(model(x), y, reduction="sum")
        finally:
            for handle in handles:
                handle.remove()
    return total / samples


def exact_weight_trace(model, batches, name):
    """Tr of the exact Hessian (torch.autograd.functional.hessian) of the loss over `name`'s weight."""
    w0 = model.get_submodule(name).weight.detach().clone()

    def loss_at(w):
        samples = sum(len(y) for _, y in batches)
        return sum(F.cross_entropy(torch.func.functional_call(model, {f"{name}.weight": w}, (x,)), y, reduction="sum")
                   for x, y in batches) / samples

    model.eval()
    hessian = torch.autograd.functional.hessian(loss_at, w0)
    return float(hessian.reshape(w0.numel(), w0.numel()).diagonal().sum())


def exact_input_trace(model, batches, name):
    """Tr of the exact Hessian of the loss over `name`'s input, on every sample of every batch."""
    module = model.get_submodule(name)
    shapes = []
    handle = module.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()

    def loss_at(*zs):
        return mean_loss(model, batches, {name: lambda b: (lambda m, args: (args[0] + zs[b],))})

    hessian = torch.autograd.functional.hessian(loss_at, tuple(torch.zeros(s, dtype=torch.float64) for s in shapes))
    return float(sum(hessian[b][b].reshape(math.prod(s), math.prod(s)).diagonal().sum() for b, s in enumerate(shapes)))


@pytest.mark.parametrize("seed", [0, 1])
def test_hutchinson_traces_of_weights_and_inputs_match_the_exact_hessian(seed):
    """A trained model (HAWQ measures trained ones: the weights' first-order couplings are small there,
    so 300 probes pin every block's trace to a few per cent)."""
    batches = random_batches(seed, shape=(1, 4, 4))
    model = trained(small_cnn(seed, channels=2, size=4), batches)
    names = ["0", "4"]  # the conv (input: the images) and the linear layer (input: tanh of batch norm)
    traces = layer_traces(model, batches, names, probes=300, seed=seed)
    for name in names:
        for kind, exact in (("weight", exact_weight_trace(model, batches, name)),
                            ("input", exact_input_trace(model, batches, name))):
            estimate = getattr(traces[name], kind)
            assert estimate.probes == 300
            assert estimate.numel == (model.get_submodule(name).weight.numel() if kind == "weight"
                                      else sum(x.numel() for x, _ in batches) if name == "0"
                                      else sum(len(y) for _, y in batches) * 2 * 4 * 4)
            # unbiased: within Z standard errors of the truth (plus float64 rounding)
            assert abs(estimate.trace - exact) <= Z * estimate.std_error + 1e-9 * abs(exact), (name, kind, exact, estimate)
            # and the band is narrow enough to reject an estimator off by a factor of 2 either way
            assert Z * estimate.std_error < abs(exact) / 2, (name, kind, exact, estimate)


def test_the_model_is_left_as_it_was():
    model = small_cnn()
    model.train()
    before = copy.deepcopy(model.state_dict())
    layer_traces(model, random_batches(), ["0", "4"], probes=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class Quadratic(nn.Module):
    """L(theta) = theta^T A theta / 2 over the concatenation of the parameters."""

    def __init__(self, sizes, a):
        super().__init__()
        self.blocks = nn.ParameterList([nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in sizes])
        self.a = a

    def loss(self, model):
        theta = torch.cat(list(self.blocks))
        return [0.5 * theta @ self.a @ theta]


def coupled_quadratic(sizes, seed=0):
    """A symmetric A whose diagonal blocks are diagonal and whose blocks between parameters are dense:
    a block's Rademacher quadratic form is exact once the couplings cancel, and noisy while they do not."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    starts = np.cumsum([0, *sizes])
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        diag = a[lo:hi, lo:hi].diagonal().clone()
        a[lo:hi, lo:hi] = torch.diag(diag)
    return Quadratic(sizes, a), [float(a[lo:hi, lo:hi].trace()) for lo, hi in zip(starts[:-1], starts[1:], strict=True)]


@pytest.mark.parametrize("hold_graphs", [True, False])
@pytest.mark.parametrize("sizes", [(3, 4), (3, 4, 5), (2, 2, 3, 3, 4)])
def test_sign_codes_cancel_the_couplings_between_groups_exactly(sizes, hold_graphs):
    model, traces = coupled_quadratic(sizes)
    blocks = [[p] for p in model.blocks]
    decoupled = hutchinson_traces(model, model.loss, blocks, probes=5, groups=list(range(len(sizes))),
                                  hold_graphs=hold_graphs)
    for estimate, exact in zip(decoupled, traces, strict=True):
        assert estimate.trace == pytest.approx(exact, abs=1e-9) and estimate.std_error == pytest.approx(0, abs=1e-9)
    coupled = hutchinson_traces(model, model.loss, blocks, probes=5, hold_graphs=hold_graphs)  # one group: noise
    assert all(estimate.std_error > 1e-3 for estimate in coupled)


@pytest.mark.parametrize("groups", range(1, 10))
def test_sign_codes_are_orthogonal(groups):
    codes = sign_codes(groups)
    order = codes.shape[0]  # products per probe: the smallest power of two that holds every group
    assert order == 2 ** math.ceil(math.log2(groups)) and codes.shape == (order, groups)
    assert np.array_equal(np.abs(codes), np.ones_like(codes))
    assert np.array_equal(codes.T @ codes, order * np.eye(groups))


def lsq_error(x, bits, signed, step_from, per_channel=False):
    """||clamp(round(x / s), Qn, Qp) s - x||^2 with LSQ's first step s = 2 mean|.| / sqrt(Qp) of `step_from`."""
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if per_channel:
        s = (2 * step_from.abs().flatten(1).mean(1) / math.sqrt(qp)).view(-1, *([1] * (x.dim() - 1)))
    else:
        s = 2 * step_from.abs().mean() / math.sqrt(qp)
    return float(((torch.clamp(torch.round(x / s), qn, qp) * s - x).double() ** 2).sum())


@pytest.mark.parametrize("per_channel", [False, True])
def test_hawq_errors_are_those_of_the_lsq_quantizers_at_their_initialisation(per_channel):
    model = small_cnn().float()
    batches = random_batches(dtype=torch.float32)
    qcfg = OmegaConf.merge(LSQ, {"per_channel": per_channel})
    measured = hawq_sensitivity(model, batches, ["0", "4"], [2, 4], [3, 6], qcfg, probes=2)
    inputs = {}
    hook = model[4].register_forward_pre_hook(lambda m, args: inputs.setdefault(len(inputs), args[0].detach()))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    hook.remove()
    for name, module in (("0", model[0]), ("4", model[4])):
        for w in (2, 4):
            assert measured.weight_error[name][w] == pytest.approx(
                lsq_error(module.weight.detach(), w, True, module.weight.detach(), per_channel), rel=1e-5)
    layer_inputs = {"0": [x for x, _ in batches], "4": [inputs[0], inputs[1]]}
    for name, xs in layer_inputs.items():
        for a in (3, 6):  # both inputs take negative values: a signed grid, the step from the first batch
            expected = sum(lsq_error(x, a, True, xs[0]) for x in xs)
            assert measured.input_error[name][a] == pytest.approx(expected, rel=1e-5)
        traces = measured.traces[name]
        omega = (max(traces.weight.trace, 0) / traces.weight.numel * measured.weight_error[name][4]
                 + max(traces.input.trace, 0) / traces.input.numel * measured.input_error[name][3])
        assert measured.scores()[name][(4, 3)] == pytest.approx(-omega)
    assert set(measured.scores()["0"]) == {(2, 3), (2, 6), (4, 3), (4, 6)}


def test_single_layer_loss_increases_are_those_of_the_quantized_model():
    model = small_cnn().float()
    batches = random_batches(dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    measured = loss_sensitivity(model, batches, ["0", "4"], [2, 4], [3, 6], LSQ)
    loss = CrossEntropyOnBatches(batches)
    base = loss_value(model, loss)
    assert measured.loss == pytest.approx(base)
    for name in ("0", "4"):
        for w in (2, 4):  # only this layer's weight quantized (its input at 32 bits: not quantized)
            alone = quantize_model(copy.deepcopy(model), {name: (w, 32)}, LSQ)
            assert measured.weight[name][w] == pytest.approx(loss_value(alone, loss) - base, rel=1e-5, abs=1e-7)
        for a in (3, 6):  # only its input, the quantizer initialised on the first batch as calibration does
            alone = quantize_model(copy.deepcopy(model), {name: (32, a)}, LSQ)
            assert measured.input[name][a] == pytest.approx(loss_value(alone, loss) - base, rel=1e-5, abs=1e-7)
        assert measured.scores()[name][(2, 6)] == pytest.approx(-(measured.weight[name][2] + measured.input[name][6]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored bit for bit
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- policies


@pytest.fixture(scope="module")
def trained_resnet8():
    """ResNet-8 after 15 SGD steps on a fixed batch of random 28 x 28 images (a model with some structure)."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32])]
    return model, batches


def resolve(spec, model, batches, *overrides, probes=3, reference=True):
    cfg = compose_config("evaluate", list(overrides))
    ref = Reference(model, lambda: batches, torch.device("cpu"), probes=probes, seed=0) if reference else None
    return resolve_policy(spec, "resnet8", lambda: create_model("resnet8", num_classes=10, in_channels=1),
                          Geometry(28, 1), cfg.quant, search_cfg=cfg.search, reference=ref), cfg


def policies_within(policy, layers, cfg):
    """Every policy of the candidates (fixed layers at their bits) with its BitOps, as brute force
    over single-layer moves from `policy`: (layer, w, a, bitops of the moved policy)."""
    bits = policy.bits()
    cw, ca = cfg.search.quant.candidates_w, cfg.search.quant.candidates_a
    for layer in layers:
        if policy.layers[layer.name].fixed:
            continue
        for w in cw:
            for a in ca:
                moved = {**bits, layer.name: (w, a)}
                yield layer.name, w, a, sum(lay.macs * moved[lay.name][0] * moved[lay.name][1] for lay in layers)


@pytest.mark.parametrize("spec", ["hawq", "sensitivity"])
def test_a_derived_policy_meets_the_budget_and_records_its_measurements(spec, trained_resnet8):
    model, batches = trained_resnet8
    before = copy.deepcopy(model.state_dict())
    (policy, layers), cfg = resolve(spec, model, batches)
    cost, budget = policy.cost["target"], policy.budget
    assert budget is not None and cost.bitops <= budget.bitops
    assert cost.bitops >= cfg.search.budget_fill * budget.bitops  # some policy fills it, so the fit does
    fixed = {name for name, entry in policy.layers.items() if entry.fixed}
    assert fixed == {"conv1", "fc"} and all(policy.bits()[name] == (8, 8) for name in fixed)
    searched = [layer.name for layer in layers if layer.name not in fixed]
    assert {bits for name, bits in policy.bits().items() if name in searched} <= {
        (w, a) for w in cfg.search.quant.candidates_w for a in cfg.search.quant.candidates_a}

    record = policy.provenance
    assert record["method"] == spec and record["batches"] == 2 and record["samples"] == 32 and record["seconds"] >= 0
    assert record["candidates_w"] == sorted(cfg.search.quant.candidates_w) and record["fit"]["fill_held"] is True
    assert set(record["layers"]) == set(searched)
    omega = {}  # Omega_l(w, a) recomputed from what the provenance records alone
    for name, entry in record["layers"].items():
        if spec == "hawq":
            assert record["probes"] == 3
            for kind in ("weight_trace", "input_trace"):
                trace = entry[kind]
                assert trace["probes"] == 3 and trace["numel"] > 0 and trace["std_error"] >= 0
            weight_scale = max(entry["weight_trace"]["trace"], 0) / entry["weight_trace"]["numel"]
            input_scale = max(entry["input_trace"]["trace"], 0) / entry["input_trace"]["numel"]
            omega[name] = {(w, a): weight_scale * entry["weight_error"][str(w)] + input_scale * entry["input_error"][str(a)]
                           for w in record["candidates_w"] for a in record["candidates_a"]}
        else:
            omega[name] = {(w, a): entry["weight_loss_increase"][str(w)] + entry["input_loss_increase"][str(a)]
                           for w in record["candidates_w"] for a in record["candidates_a"]}
        assert entry["omega"] == pytest.approx(omega[name][policy.bits()[name]])
    total = sum(omega[name][policy.bits()[name]] for name in searched)
    assert record["fit"]["objective"] == pytest.approx(-total)
    # no single-layer change that stays within [fill * budget, budget] has a smaller total Omega
    for name, w, a, bitops in policies_within(policy, layers, cfg):
        if cfg.search.budget_fill * budget.bitops <= bitops <= budget.bitops:
            assert total - omega[name][policy.bits()[name]] + omega[name][(w, a)] >= total - 1e-9 * abs(total)
    # measured without changing the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", ["hawq", "sensitivity"])
def test_a_derived_policy_without_the_full_precision_model_is_one_clear_error(spec, trained_resnet8):
    model, batches = trained_resnet8
    with pytest.raises(MPQError) as err:
        resolve(spec, model, batches, reference=False)
    message = str(err.value)
    assert f"policy={spec}" in message and "full-precision checkpoint" in message and "\n" not in message
    with pytest.raises(MPQError, match=f"policy={spec} needs search.budget_uniform_bits"):
        resolve(spec, model, batches, "search.budget_uniform_bits=null")


def test_a_budget_below_every_policy_is_the_knapsacks_error(trained_resnet8):
    model, batches = trained_resnet8
    with pytest.raises(MPQError, match="is impossible"):
        resolve("sensitivity", model, batches, "search.budget_uniform_bits=1.0")


@pytest.mark.parametrize("override,message", [
    ("sensitivity.probes=1", "sensitivity.probes=1 is invalid: expected a whole number >= 2"),
    ("sensitivity.batches=0", "sensitivity.batches=0 is invalid: expected a whole number >= 1"),
    ("sensitivity.hold_graphs=maybe", "sensitivity.hold_graphs='maybe' is invalid: expected true or false"),
])
def test_the_measurements_settings_are_validated(override, message):
    validate_config(compose_config("evaluate"))
    with pytest.raises(MPQError) as err:
        validate_config(compose_config("evaluate", [override]))
    assert str(err.value) == message


def test_best_of_k_random_keeps_the_draw_of_least_held_out_loss(trained_resnet8):
    """random-best:K draws random:<K seed + i>, scores each quantized full-precision model on the held-out
    batches, keeps the least; the same K draws resolved one by one give back the recorded losses."""
    from framework.landscape.batches import CrossEntropyOnBatches

    model, batches = trained_resnet8
    before = copy.deepcopy(model.state_dict())
    (policy, layers), cfg = resolve("random-best:3", model, batches)
    record = policy.provenance
    assert record["method"] == "random-best" and record["k"] == 3 and set(record["held_out_loss"]) == {"0", "1", "2"}
    losses = {int(seed): value for seed, value in record["held_out_loss"].items()}
    assert record["chosen_seed"] == min(losses, key=losses.get)
    (drawn, _), _ = resolve(f"random:{record['chosen_seed']}", model, batches)
    assert drawn.bits() == policy.bits() and policy.cost["target"].bitops <= policy.budget.bitops
    for seed, value in losses.items():  # each loss is that of the model quantized under that draw
        (one, _), _ = resolve(f"random:{seed}", model, batches)
        quantized = quantize_model(copy.deepcopy(model), one.bits(), cfg.quant, layers)
        with torch.no_grad():
            quantized.eval()
            quantized(batches[0][0])
        assert loss_value(quantized, CrossEntropyOnBatches(batches)) == pytest.approx(value, rel=1e-5)
    assert len({tuple(sorted(resolve(f"random:{s}", model, batches)[0][0].bits().items())) for s in losses}) > 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", ["random-best:0", "random-best:two"])
def test_a_malformed_best_of_k_is_one_clear_error(spec, trained_resnet8):
    model, batches = trained_resnet8
    with pytest.raises(MPQError, match=f"policy={spec} is malformed; write random-best:<K>"):
        resolve(spec, model, batches)


@pytest.mark.parametrize("spec", ["hawq", "random-best:2"])
def test_a_measured_policy_leaves_the_random_streams_as_it_found_them(spec, trained_resnet8):
    """The fine-tune after `hawq` or `random-best` draws the dropout masks and data it would draw after
    `uniform:W/A` at the same seed: the study's rows stay paired."""
    import random

    model, batches = trained_resnet8
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    resolve(spec, model, batches)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    resolve("uniform:3/3", model, batches)  # what resolving any policy draws (the float model's initialisation)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]
