"""CPU kernels of the fake quantizers in C (quant_kernels.c): one pass over the tensor each way.

On a CPU, torch.compile's code for the supernet's mixed activation spends several times its forward
time in the backward (nine reductions, each with a cascade-summation helper), and each compiled call
pays for dynamo's guards and wrappers (benchmarks/quant_overhead.py --profile). The C kernels do
the forward in one pass and the backward in one pass per chunk of 2048 elements, all candidates'
sums kept in L1, parallel over chunks with OpenMP (torch's own runtime, already loaded) and
vectorised by the compiler (reductions into 16 partial sums, vector registers); with AVX-512 and
1-4 candidates, the mixed activation takes every candidate in one pass over each 16 elements
(intrinsics, the same operations in the same order). Built without fused multiply-adds
(`-ffp-contract=off`), the forward passes equal the plain torch ops bit for bit.

Around the kernels, each small torch op is costly on a CPU: the first op after a large kernel runs
with the caches that kernel flushed. So a supernet layer's mixes take the softmax of their logits and
the ranges' `|rho| + 1e-8` in the same call, and return the logits' and ranges' gradients from it
(`mixed_learned_range_of_params`, `mixed_minmax_of_logits`): one autograd node per mix, not one per
op (benchmarks/README.md measures the step time).

The library is compiled on first use with the C compiler (`$CC`, else `cc`/`gcc`) at -O3 for the
machine's own CPU and kept under `$TORCH_EXTENSIONS_DIR/mpq_quant_kernels/<key>/`: the key hashes
the source, the flags, the compiler's version and the CPU's feature flags, so a cache shared by
nodes with other CPUs gets one build per kind of CPU, never an illegal instruction. The build is
written to a temporary file and renamed, so processes starting together (DeepSpeed ranks, Ray
trials) never load half a file. Without a compiler, `available()` is False, `quant.kernels=auto`
resolves to the reference backend and `quant.kernels=native` is refused (framework.quant.kernels).

Floating-point sums (the gradients of steps, ranges and mixing weights) are taken per chunk of 2048
elements into a slot of their own and added in chunk order after the parallel loop, never with
atomics: a call gives the same bits whichever thread ran which chunk and at any thread count.

The library is loaded as a `ctypes.PyDLL`, so a call keeps the GIL, as torch's own ops do while
they run their OpenMP loops: a call that released it (`ctypes.CDLL`) would let the process's other
Python threads (tracking, the process group) run during every kernel and take a core from one of
its OpenMP threads, and a static schedule waits for the slowest thread.

Every kernel takes float32 tensors on the CPU; the autograd functions here make them contiguous and
are differentiable once (Hessian-vector products ask the seam for a twice-differentiable backend:
:func:`framework.quant.kernels.twice_differentiable`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")
MAX_CANDIDATES = 16  # MAX_K in quant_kernels.c

_LIB: ctypes.CDLL | None = None
_TRIED = False
_KEY: str | None = None
_FAILURE: str | None = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
    return Path(root) / "mpq_quant_kernels"


def _key(cc: str) -> str:
    """The build key: a hash of the source, the flags, the compiler's version and the CPU's features."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    return hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, platform.machine(), _cpu_flags()])
                          .encode()).hexdigest()[:16]


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and CPU, built once (atomically)."""
    global _KEY
    key = _KEY = _key(cc)
    target = cache_dir() / key / "libmpq_quant.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.mixed_range_forward.argtypes = [p, p, i64, p, p, p, i32, i32, i32]
    lib.mixed_range_backward.argtypes = [p, p, p, i64, p, p, p, i32, i32, p, p, i32]
    lib.lsq_forward.argtypes = [p, p, i64, i64, p, f32, f32, i32]
    lib.lsq_backward.argtypes = [p, p, p, i64, i64, p, f32, f32, ctypes.c_double, p, i32]
    lib.mixed_minmax_forward.argtypes = [p, p, i64, p, p, i32]
    lib.mixed_minmax_backward.argtypes = [p, p, p, i64, p, p, i32, p]
    lib.mixed_range_forward_params.argtypes = [p, p, i64, p, p, p, i32, i32, i32, p]
    lib.mixed_range_backward_params.argtypes = [p, p, p, i64, p, p, i32, i32, p, p, i32]
    lib.mixed_minmax_backward_logits.argtypes = [p, p, p, i64, p, p, i32, p]
    for fn in (lib.mixed_range_forward, lib.mixed_range_backward, lib.lsq_forward, lib.lsq_backward,
               lib.mixed_minmax_forward, lib.mixed_minmax_backward, lib.mixed_range_forward_params,
               lib.mixed_range_backward_params,
               lib.mixed_minmax_backward_logits):
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None where they cannot be (:func:`failure` says why)."""
    global _LIB, _TRIED, _FAILURE
    if _TRIED:
        return _LIB
    _TRIED = True
    cc = _compiler()
    if cc is None:
        _FAILURE = "no C compiler (cc, gcc or $CC)"
        log.warning("%s: the quantizers' C kernels are unavailable", _FAILURE)
        return None
    try:
        _LIB = _declare(ctypes.PyDLL(str(_build(cc))))  # keeps the GIL during calls (module docstring)
    except (OSError, RuntimeError) as err:
        _FAILURE = f"the build failed: {err}"
        log.warning("the quantizers' C kernels could not be built (%s)", err)
    return _LIB


def available() -> bool:
    return library() is not None


def failure() -> str | None:
    """Why the kernels are unavailable (None when they are, or were not tried yet)."""
    return _FAILURE


def build_key() -> str | None:
    """The loaded library's build key (None when it is not loaded)."""
    return _KEY if available() else None


def usable(x: torch.Tensor) -> bool:
    """Whether the C kernels can take `x`: float32 on the CPU, and the library builds here."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous float32 tensor (itself when it is one: no dispatch on the common path)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.contiguous().to(torch.float32)


def differentiable_once(backward):
    """`once_differentiable` where it matters: a backward with `create_graph` (grad mode on) goes
    through it, so its outputs refuse a second derivative; the usual backward (grad mode off) skips
    its wrapper, which costs more than the rest of a small kernel's Python (one no_grad block and
    one check per node on every call, even with warm caches)."""
    wrapped = once_differentiable(backward)

    @functools.wraps(backward)
    def dispatch(ctx, *grads):
        if torch.is_grad_enabled():
            return wrapped(ctx, *grads)
        return backward(ctx, *grads)

    return dispatch


_LEVELS: dict[tuple[int, ...], torch.Tensor] = {}


def _levels(levels: tuple[int, ...]) -> torch.Tensor:
    if levels not in _LEVELS:
        _LEVELS[levels] = torch.tensor(levels, dtype=torch.float32)
    return _LEVELS[levels]


class _MixedRange(torch.autograd.Function):
    """sum_i p_i * Q(x; r_i, L_i) in one pass each way (quant_kernels.c gives the gradients)."""

    @staticmethod
    def forward(ctx, x, probs, ranges, levels: tuple[int, ...], signed: bool):
        lib = library()
        x, p, r = _f32(x), _f32(probs.detach()), _f32(ranges.detach())
        lv = _levels(levels)
        y = torch.empty_like(x)
        lib.mixed_range_forward(_ptr(x), _ptr(y), x.numel(), _ptr(p), _ptr(r), _ptr(lv), len(levels), int(signed),
                                torch.get_num_threads())
        ctx.save_for_backward(x, p, r)
        ctx.levels, ctx.signed = levels, signed
        ctx.dtypes = probs.dtype, ranges.dtype
        return y

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        x, p, r = ctx.saved_tensors
        grad = _f32(grad)
        k = len(ctx.levels)
        gx = torch.empty_like(x)
        gpr = torch.empty(2, k)  # dL/dp, dL/dr (summed in double by the kernel)
        library().mixed_range_backward(_ptr(grad), _ptr(x), _ptr(gx), x.numel(), _ptr(p), _ptr(r),
                                       _ptr(_levels(ctx.levels)), k, int(ctx.signed), _ptr(gpr[0]), _ptr(gpr[1]),
                                       torch.get_num_threads())
        return gx, gpr[0].to(ctx.dtypes[0]), gpr[1].to(ctx.dtypes[1]), None, None


def mixed_learned_range(x: torch.Tensor, probs: torch.Tensor, ranges: torch.Tensor, levels: tuple[int, ...],
                        signed: bool) -> torch.Tensor:
    """The supernet's mixed learned-range activation (framework.quant.reference.mixed_learned_range)."""
    if len(levels) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidate bit-widths, got {len(levels)}")
    return _MixedRange.apply(x, probs, ranges, tuple(int(v) for v in levels), bool(signed))


class _LSQ(torch.autograd.Function):
    """LSQ with its step-size gradient scaled by `grad_scale`, per tensor or per outer index."""

    @staticmethod
    def forward(ctx, x, step, qn: float, qp: float, grad_scale: float):
        x, s = _f32(x), _f32(step)  # the step is read in place (a parameter: no copy, no view)
        outer = s.numel()
        y = torch.empty_like(x)
        library().lsq_forward(_ptr(x), _ptr(y), outer, x.numel() // outer, _ptr(s), qn, qp, torch.get_num_threads())
        ctx.save_for_backward(x, s)
        ctx.bounds, ctx.grad_scale, ctx.step_shape, ctx.step_dtype = (qn, qp), grad_scale, step.shape, step.dtype
        return y

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        grad = _f32(grad)
        outer = s.numel()
        gx = torch.empty_like(x)
        grad_step = torch.empty(ctx.step_shape)  # each sum (in double) times grad_scale, in float32
        library().lsq_backward(_ptr(grad), _ptr(x), _ptr(gx), outer, x.numel() // outer, _ptr(s), *ctx.bounds,
                               ctx.grad_scale, _ptr(grad_step), torch.get_num_threads())
        return gx, grad_step if ctx.step_dtype == torch.float32 else grad_step.to(ctx.step_dtype), None, None, None


def lsq(x: torch.Tensor, step: torch.Tensor, qn: float, qp: float, grad_scale: float) -> torch.Tensor:
    """`clamp(round(x / s), Qn, Qp) * s`, step-size gradient scaled by `grad_scale` (LSQ). `step` has
    one element, or one per index of x's first dimension (per output channel)."""
    if step.numel() not in (1, x.shape[0] if x.dim() else 1):
        raise ValueError(f"LSQ step of {step.numel()} elements for a tensor of shape {tuple(x.shape)}")
    return _LSQ.apply(x, step, float(qn), float(qp), float(grad_scale))


class _MixedMinMax(torch.autograd.Function):
    """sum_j p_j * Q_j(W) over min-max candidates (quantizers._MixedMinMaxFunction's math) in one call."""

    @staticmethod
    def forward(ctx, w, probs, qps):
        w, p = _f32(w), _f32(probs.detach())
        y = torch.empty_like(w)
        library().mixed_minmax_forward(_ptr(w), _ptr(y), w.numel(), _ptr(p), _ptr(qps), qps.numel())
        ctx.save_for_backward(w, p, qps)
        ctx.probs_dtype = probs.dtype
        return y

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        w, p, qps = ctx.saved_tensors
        grad = _f32(grad)
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[0] else None  # grad * sum(p)
        grad_p = torch.empty(qps.numel()) if ctx.needs_input_grad[1] else None
        library().mixed_minmax_backward(_ptr(grad), _ptr(w), _ptr(grad_w), w.numel(), _ptr(p), _ptr(qps), qps.numel(),
                                        _ptr(grad_p))
        return grad_w, None if grad_p is None else grad_p.to(ctx.probs_dtype), None


def mixed_minmax(w: torch.Tensor, probs: torch.Tensor, qps: torch.Tensor) -> torch.Tensor:
    """`sum_j probs[j] * clamp(round(W / s_j), -qps[j], qps[j]) * s_j`, `s_j = max|W| / qps[j]`
    (float32 `qps` on the CPU, one per low-bit candidate)."""
    if qps.numel() > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidate bit-widths, got {qps.numel()}")
    return _MixedMinMax.apply(w, probs, qps.to(torch.float32).contiguous())


# -- the supernet's mixes with the softmax of their logits (and the ranges' |rho| + 1e-8) in the call ------
# One autograd node per mix instead of five or six (module docstring): the softmax itself stays torch's,
# one call without a node, so the outputs equal the plain ops' bit for bit.


def takes_params(*params: torch.Tensor) -> bool:
    """Whether the parameters can be read in place by the kernels (float32, contiguous, on the CPU)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in params)


class _MixedRangeOfParams(torch.autograd.Function):
    """sum_i softmax(a)_i * Q(x; |rho_i| + 1e-8, L_i), with the gradients of `a` and of every rho_i."""

    @staticmethod
    def forward(ctx, x, logits, levels: tuple[int, ...], signed: bool, *rhos):
        k = len(levels)
        x = _f32(x)
        y = torch.empty_like(x)
        probs = torch.softmax(logits, 0)  # torch's, so the output equals the plain ops' bit for bit
        state = torch.empty(3 * k)  # p, r and the rho values read, for the backward
        rho_ptrs = (ctypes.c_void_p * k)(*(rho.data_ptr() for rho in rhos))
        library().mixed_range_forward_params(_ptr(x), _ptr(y), x.numel(), _ptr(probs), rho_ptrs,
                                             _ptr(_levels(levels)), k, int(signed), torch.get_num_threads(),
                                             _ptr(state))
        ctx.save_for_backward(x)
        ctx.state, ctx.levels, ctx.signed = state, levels, signed
        return y

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = _f32(grad)
        k = len(ctx.levels)
        gx = torch.empty_like(x)
        grad_logits, grad_rho = torch.empty(2, k).unbind(0)
        library().mixed_range_backward_params(_ptr(grad), _ptr(x), _ptr(gx), x.numel(), _ptr(ctx.state),
                                              _ptr(_levels(ctx.levels)), k, int(ctx.signed), _ptr(grad_logits),
                                              _ptr(grad_rho), torch.get_num_threads())
        return (gx, grad_logits, None, None, *grad_rho.unbind(0))


def mixed_learned_range_of_params(x: torch.Tensor, logits: torch.Tensor, rhos: list[torch.Tensor],
                                  levels: tuple[int, ...], signed: bool) -> torch.Tensor:
    """:func:`mixed_learned_range` with probs = softmax(logits) and ranges |rho_i| + 1e-8 (one scalar
    parameter rho_i per candidate) computed in the same call, differentiable w.r.t. all of them. The
    parameters must pass :func:`takes_params`."""
    if not 0 < len(levels) <= MAX_CANDIDATES or len(rhos) != len(levels) or logits.numel() != len(levels):
        raise ValueError(f"{len(levels)} candidates (at most {MAX_CANDIDATES}), {logits.numel()} logits and "
                         f"{len(rhos)} ranges: one of each per candidate")
    return _MixedRangeOfParams.apply(x, logits, levels, signed, *rhos)


class _MixedMinMaxOfLogits(torch.autograd.Function):
    """sum_j softmax(a)_j * Q_j(W) over min-max candidates, with the gradients of W and `a`."""

    @staticmethod
    def forward(ctx, w, logits, qps):
        w = _f32(w)
        y = torch.empty_like(w)
        probs = torch.softmax(logits, 0)  # torch's, so the output equals the plain ops' bit for bit
        library().mixed_minmax_forward(_ptr(w), _ptr(y), w.numel(), _ptr(probs), _ptr(qps), qps.numel())
        ctx.save_for_backward(w)
        ctx.probs, ctx.qps = probs, qps
        return y

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        grad = _f32(grad)
        needs_w, needs_logits = ctx.needs_input_grad[:2]
        grad_w = torch.empty_like(w) if needs_w else None  # grad * sum(p)
        grad_logits = torch.empty(ctx.qps.numel()) if needs_logits else None
        library().mixed_minmax_backward_logits(_ptr(grad), _ptr(w), _ptr(grad_w), w.numel(), _ptr(ctx.probs),
                                               _ptr(ctx.qps), ctx.qps.numel(), _ptr(grad_logits))
        return grad_w, grad_logits, None


def mixed_minmax_of_logits(w: torch.Tensor, logits: torch.Tensor, qps: torch.Tensor) -> torch.Tensor:
    """:func:`mixed_minmax` with probs = softmax(logits) computed in the same call (float32 `qps` on
    the CPU, contiguous; `logits` must pass :func:`takes_params`)."""
    if not 0 < qps.numel() <= MAX_CANDIDATES or logits.numel() != qps.numel():
        raise ValueError(f"{qps.numel()} candidates (at most {MAX_CANDIDATES}) and {logits.numel()} logits: "
                         "one logit per candidate")
    return _MixedMinMaxOfLogits.apply(w, logits, qps)
