"""`search.sharpness` and `finetune.sharpness`: the two-pass (sharpness-aware) rule and its parameters.

The rule names are framework.sharpness' registry (`RULES`) plus `none`; SAQ perturbs the weights
of a fixed-precision model, so the search (a supernet) does not offer it. Checks radii and ASGA's
parameters (`rho_min <= rho_max`), the two-pass period and SAQ's case (1, 2 or 3).
"""

from pydantic import model_validator

from framework.config.types import Flag, Schema, between, invalid, number, one_of, whole

#: rules a supernet search cannot use: SAQ perturbs the weights after quantization to fixed bits
NOT_IN_SEARCH = ("saq",)


def _rules() -> tuple[str, ...]:
    from framework.sharpness.rules import RULES

    return ("none", *RULES)


def _search_rules() -> tuple[str, ...]:
    return tuple(name for name in _rules() if name not in NOT_IN_SEARCH)


class SharpnessConfig(Schema):
    """The parameters every rule reads (SAM, ASAM: `rho`, `eta`; ASGA: `rho` as rho0 and the rest)."""

    name: one_of(_search_rules)
    rho: number(0)
    eta: number(0)
    lookback: number(0)
    rho_min: number(0)
    rho_max: number(0)
    ema_momentum: between(0, 1)
    adaptive: Flag
    gap: one_of(("absolute", "per_radius"))
    period: whole(1)

    @model_validator(mode="after")
    def _radius_range(self):
        if self.rho_min > self.rho_max:
            raise invalid(f"expected rho_min <= rho_max ({self.rho_max})", "rho_min", self.rho_min)
        return self


class FinetuneSharpnessConfig(SharpnessConfig):
    """Fine-tuning's rule: also SAQ, with its case (1 L(Q(w)+eps(w)), 2 L(Q(w+eps(w))), 3 L(Q(w)+eps(Q(w))))."""

    name: one_of(_rules)
    saq_case: one_of((1, 2, 3)) | None
