"""One seam for the fake quantizers' kernels: a reference implementation and backends behind it.

Every quantizer operation has one reference implementation, eager torch
(:mod:`framework.quant.reference`, which states the math and the tie rules). A backend computes the
same operations by other kernels; the tests hold each backend to the reference (forward to the bit,
gradients to float tolerance, on random inputs and on inputs built exactly on the clipping bounds and
half-way points). The operations:

=====================================  ===========================================================
``lsq(x, step, qn, qp, g)``            LSQ fake quantization (fixed-policy layers, weights and activations)
``learned_range(x, rho, L, signed)``   one PACT quantizer, `r = |rho| + 1e-8` (the supernet's 8-bit layers)
``mixed_learned_range(x, p, r, L, s)`` the supernet's mixed activation, `sum_i p_i Q(x; r_i, L_i)`
``mixed_learned_range_of_params``      the same with `p = softmax(logits)`, `r_i = |rho_i| + 1e-8`
``mixed_minmax(w, p, qps)``            the supernet's mixed weight over min-max candidates
``mixed_minmax_of_logits``             the same with `p = softmax(logits)`
=====================================  ===========================================================

Backends (``quant.kernels``):

- ``reference``: the reference ops; the only one that can be differentiated twice.
- ``compiled``: `torch.compile` of LSQ and the mixed activation (:mod:`framework.quant.compiled`),
  the reference for the rest.
- ``native``: the C kernels (:mod:`framework.quant.native`) for float32 CPU tensors; tensors of
  another dtype (an export's float64 check) take the reference op.
- ``auto``: the fastest backend available and tested on the device: ``native`` on a CPU where a C
  compiler builds the kernels, ``compiled`` on CUDA, else ``reference``.

The backend is chosen once per process, when a stage starts (:func:`use`, from ``quant.kernels``),
and every quantizer asks :func:`active` for it. Hessian-vector products run inside
:func:`twice_differentiable`. :func:`describe` gives what ran (requested and resolved backend,
build key, thread count), which every `result.json`, checkpoint, study row and Aim run records.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from framework.errors import MPQError
from framework.quant import compiled, native, reference
from framework.results import record_with_every_result

CHOICES = ("auto", "reference", "compiled", "native")


class Backend:
    """The reference backend; subclasses replace the operations they accelerate."""

    name = "reference"
    twice_differentiable = True

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device` (None: it can)."""
        return None

    def build_key(self) -> str:
        return f"torch-{torch.__version__}"

    def lsq(self, x, step, qn: float, qp: float, grad_scale: float):
        return reference.lsq(x, step, qn, qp, grad_scale)

    def mixed_learned_range(self, x, probs, ranges, levels: tuple[int, ...], signed: bool):
        return reference.mixed_learned_range(x, probs, ranges, levels, signed)

    def mixed_learned_range_of_params(self, x, logits, rhos, levels: tuple[int, ...], signed: bool):
        return self.mixed_learned_range(x, torch.softmax(logits, 0), reference.ranges_of(rhos), levels, signed)

    def learned_range(self, x, rho, levels: int, signed: bool):
        return self.mixed_learned_range_of_params(x, _ONE_LOGIT, [rho], (levels,), signed)

    def mixed_minmax(self, w, probs, qps):
        return reference.mixed_minmax(w, probs, qps)

    def mixed_minmax_of_logits(self, w, logits, qps):
        return self.mixed_minmax(w, torch.softmax(logits, 0), qps)


_ONE_LOGIT = torch.zeros(1)  # a single candidate's mixing weight: softmax gives 1.0 exactly


class CompiledBackend(Backend):
    name = "compiled"
    twice_differentiable = False  # "torch.compile with aot_autograd does not support double backward"

    def build_key(self) -> str:
        failed = compiled.failures()
        return super().build_key() + (f" (ran eagerly: {'; '.join(failed)})" if failed else "")

    def lsq(self, x, step, qn, qp, grad_scale):
        return compiled.lsq(x, step, qn, qp, grad_scale)

    def mixed_learned_range(self, x, probs, ranges, levels, signed):
        return compiled.compiled_mixed_learned_range(x, probs, ranges, levels, signed)


class NativeBackend(Backend):
    name = "native"
    twice_differentiable = False

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return f"the C kernels run on the CPU, and this run is on {device}"
        if not native.available():
            return f"the C kernels cannot be built here ({native.failure()})"
        return None

    def build_key(self) -> str:
        return f"{super().build_key()} libmpq_quant-{native.build_key()}"

    def lsq(self, x, step, qn, qp, grad_scale):
        if native.usable(x):
            return native.lsq(x, step, qn, qp, grad_scale)
        return super().lsq(x, step, qn, qp, grad_scale)

    def mixed_learned_range(self, x, probs, ranges, levels, signed):
        if native.usable(x):
            return native.mixed_learned_range(x, probs, ranges, levels, signed)
        return super().mixed_learned_range(x, probs, ranges, levels, signed)

    def mixed_learned_range_of_params(self, x, logits, rhos, levels, signed):
        # one call that also takes the softmax and |rho| + 1e-8 and returns their gradients
        if native.usable(x) and native.takes_params(logits, *rhos):
            return native.mixed_learned_range_of_params(x, logits, list(rhos), levels, signed)
        return super().mixed_learned_range_of_params(x, logits, rhos, levels, signed)

    def learned_range(self, x, rho, levels, signed):
        if native.usable(x) and native.takes_params(rho):
            return native.mixed_learned_range_of_params(x, _ONE_LOGIT, [rho], (levels,), signed)
        return super().learned_range(x, rho, levels, signed)

    def mixed_minmax(self, w, probs, qps):
        if native.usable(w):
            return native.mixed_minmax(w, probs, qps)
        return super().mixed_minmax(w, probs, qps)

    def mixed_minmax_of_logits(self, w, logits, qps):
        if native.usable(w) and native.takes_params(logits, qps):
            return native.mixed_minmax_of_logits(w, logits, qps)
        return super().mixed_minmax_of_logits(w, logits, qps)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Backend(), CompiledBackend(), NativeBackend())}

_ACTIVE: Backend | None = None
_REQUESTED = "auto"
_DEVICE = "cpu"


def resolve(choice: str, device: torch.device | str = "cpu") -> Backend:
    """The backend `choice` names on `device` (module docstring); a clear error if it cannot run there."""
    choice = str(choice)
    if choice not in CHOICES:
        raise MPQError(f"quant.kernels={choice} is not a kernel backend; choose one of {', '.join(CHOICES)}")
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cpu" and BACKENDS["native"].unavailable(device) is None:
            return BACKENDS["native"]
        if device.type == "cuda":
            return BACKENDS["compiled"]
        return BACKENDS["reference"]
    backend = BACKENDS[choice]
    why = backend.unavailable(device)
    if why is not None:
        raise MPQError(f"quant.kernels={choice}: {why}; use quant.kernels=auto (or reference)")
    return backend


def use(choice: str, device: torch.device | str = "cpu") -> Backend:
    """Make `choice` (resolved on `device`) this process's backend; returns it."""
    global _ACTIVE, _REQUESTED, _DEVICE
    _ACTIVE = resolve(choice, device)
    _REQUESTED, _DEVICE = str(choice), str(torch.device(device))
    return _ACTIVE


def active() -> Backend:
    """This process's backend (`auto` on the CPU until a stage chose one)."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = resolve(_REQUESTED, _DEVICE)
    return _ACTIVE


@contextlib.contextmanager
def using(choice: str, device: torch.device | str = "cpu") -> Iterator[Backend]:
    """Inside, `choice` is the backend; the previous one after (benchmarks and tests compare backends)."""
    global _ACTIVE, _REQUESTED, _DEVICE
    before = _ACTIVE, _REQUESTED, _DEVICE
    try:
        yield use(choice, device)
    finally:
        _ACTIVE, _REQUESTED, _DEVICE = before


@contextlib.contextmanager
def twice_differentiable() -> Iterator[Backend]:
    """Inside, a backend whose ops can be differentiated twice (Hessian-vector products): the active
    one if it can, else the reference (the same values; gradients to float tolerance)."""
    global _ACTIVE
    before = active()
    _ACTIVE = before if before.twice_differentiable else BACKENDS["reference"]
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = before


def describe() -> dict[str, object]:
    """What quantizes in this process: requested and resolved backend, its build key, torch's threads."""
    backend = active()
    return {"requested": _REQUESTED, "backend": backend.name, "device": _DEVICE,
            "build_key": backend.build_key(), "threads": torch.get_num_threads()}


record_with_every_result("kernels", describe)
