"""Sharpness rules: where the perturbation goes and which gradient drives the update.

Every rule sees the first-pass gradient `g` of the perturbed tensors and returns their perturbation
`eps`; after the second pass it turns `(g, g_p)` into the update direction.

- **SAM** (Foret et al., ICLR 2021): `eps = rho * g / ||g||`; update along `g_p`.
- **ASAM** (Kwon et al., ICML 2021): element-wise scale `T = |w| + eta`,
  `eps = rho * T^2 g / ||T g||`; update along `g_p`.
- **ASGA** (adaptive sharpness-aware gradient aligning, ICML 2025; the SAGM rule of Wang et al.,
  CVPR 2023, with an adaptive radius, METHOD.md sec. 4)::

      theta_hat = theta + (rho / ||g|| - a) * g        # perturb with the look-back a
      direction = (g + g_p) / 2                         # implicit gradient alignment
      h   = L(theta_hat) - L(theta)                     # surrogate gap
      rho <- clip(ln(1 + max(EMA(h), 0)), rho_min, rho_max)

  With `rho = 0` and `a = 0` the step is the base optimizer's step exactly. The map
  `rho -> ln(1 + EMA(h))` with `h ~ rho ||g||` is multiplicative: it drives `rho` to `rho_min` whenever
  `||g|| < 1`. `gap=per_radius` is the scale-free variant: the gap per unit of perturbation length,
  `h / ||theta_hat - theta||` (about `||g||` to first order, whatever `rho` is), replaces `h` in the EMA.
- **SAQ** (Liu et al., sharpness-aware quantization) is SAM whose weight perturbation is placed
  relative to quantization: case 1 `L(Q(w) + eps(w))`, case 2 `L(Q(w + eps(w)))`, case 3
  `L(Q(w) + eps(Q(w)))` (the default). The placement is the two-pass optimizer's job; the rule is SAM's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Tensors = list[torch.Tensor]


def global_norm(tensors: Tensors) -> torch.Tensor:
    """||(t_1, ..., t_n)||_2 over all elements, one multi-tensor op for the per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))) if tensors else torch.tensor(0.0)


@dataclass
class SAM:
    rho: float = 0.05
    name: str = "sam"
    last_grad_norm: float = float("nan")  # ||g|| of the last perturbation (logged beside rho)

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        self.last_grad_norm = float(global_norm(grads)) if grads else 0.0
        scale = self.rho / (self.last_grad_norm + 1e-12)
        return list(torch._foreach_mul(grads, scale)) if grads else []

    def direction(self, g: torch.Tensor, g_p: torch.Tensor) -> torch.Tensor:
        return g_p

    def directions(self, grads: Tensors, grads_p: Tensors) -> Tensors:
        """:meth:`direction` for every tensor at once (multi-tensor ops where the rule has them)."""
        return [self.direction(g, g_p) for g, g_p in zip(grads, grads_p, strict=True)]

    def after_step(self, loss: float, loss_p: float) -> None:
        pass

    def state(self) -> dict[str, float]:
        return {"rho": self.rho, "grad_norm": self.last_grad_norm}

    def load_state(self, state: dict[str, float]) -> None:
        self.rho = float(state.get("rho", self.rho))


@dataclass
class ASAM(SAM):
    eta: float = 0.01
    name: str = "asam"

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        scales = [p.detach().abs() + self.eta for p in params]
        self.last_grad_norm = float(global_norm(grads)) if grads else 0.0
        norm = float(global_norm([t * g for t, g in zip(scales, grads, strict=True)])) + 1e-12
        return [self.rho * t * t * g / norm for t, g in zip(scales, grads, strict=True)]


@dataclass
class ASGA(SAM):
    lookback: float = 0.001  # a
    rho_min: float = 0.01
    rho_max: float = 0.3
    ema_momentum: float = 0.9
    adaptive: bool = True
    gap: str = "absolute"  # absolute: h; per_radius: h / ||theta_hat - theta|| (scale-free in rho)
    name: str = "asga"
    gap_ema: float | None = field(default=None)
    last_gap: float = 0.0
    last_length: float = 0.0  # ||theta_hat - theta|| = |rho - a ||g|||

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        self.last_grad_norm = float(global_norm(grads)) if grads else 0.0
        coefficient = self.rho / (self.last_grad_norm + 1e-12) - self.lookback
        self.last_length = abs(coefficient) * self.last_grad_norm
        return list(torch._foreach_mul(grads, coefficient)) if grads else []

    def direction(self, g: torch.Tensor, g_p: torch.Tensor) -> torch.Tensor:
        return (g + g_p) / 2

    def directions(self, grads: Tensors, grads_p: Tensors) -> Tensors:
        if not grads:
            return []
        out = torch._foreach_add(grads, grads_p)
        torch._foreach_div_(out, 2.0)  # (g + g_p) / 2, the same floats as direction()
        return list(out)

    def after_step(self, loss: float, loss_p: float) -> None:
        """Surrogate gap h = L(theta_hat) - L(theta) (per unit length with `gap=per_radius`), its EMA, the radius."""
        self.last_gap = loss_p - loss
        if self.gap == "per_radius":
            self.last_gap = self.last_gap / self.last_length if self.last_length > 0 else 0.0
        m = self.ema_momentum
        self.gap_ema = self.last_gap if self.gap_ema is None else m * self.gap_ema + (1 - m) * self.last_gap
        if self.adaptive:
            self.rho = adaptive_radius(self.gap_ema, self.rho_min, self.rho_max)

    def state(self) -> dict[str, float]:
        return {"rho": self.rho, "gap_ema": self.gap_ema if self.gap_ema is not None else float("nan"), "gap": self.last_gap,
                "grad_norm": self.last_grad_norm}

    def load_state(self, state: dict[str, float]) -> None:
        self.rho = float(state.get("rho", self.rho))
        ema = state.get("gap_ema")
        self.gap_ema = None if ema is None or math.isnan(float(ema)) else float(ema)


def adaptive_radius(gap_ema: float, rho_min: float, rho_max: float) -> float:
    """rho = clip(ln(1 + max(EMA(h), 0)), rho_min, rho_max)   (ASGA's adaptive perturbation radius)."""
    return float(min(max(math.log1p(max(gap_ema, 0.0)), rho_min), rho_max))


#: what ASGA's radius rule reads: the surrogate gap itself, or the gap per unit perturbation length
GAPS = ("absolute", "per_radius")

RULES = {"sam": SAM, "asam": ASAM, "asga": ASGA, "saq": SAM}


def build_rule(cfg) -> SAM:
    """A rule from a config node: `name` (sam | asam | asga | saq) and its hyperparameters."""
    name = str(cfg.name).lower()
    if name not in RULES:
        raise ValueError(f"unknown sharpness rule '{name}'; choose one of {sorted(RULES)}")
    if name == "asga":
        return ASGA(
            rho=float(cfg.rho), lookback=float(cfg.lookback), rho_min=float(cfg.rho_min), rho_max=float(cfg.rho_max),
            ema_momentum=float(cfg.ema_momentum), adaptive=bool(cfg.adaptive), gap=str(cfg.get("gap", "absolute")),
        )
    if name == "asam":
        return ASAM(rho=float(cfg.rho), eta=float(cfg.eta))
    return SAM(rho=float(cfg.rho), name=name)
