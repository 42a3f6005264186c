"""`search`: the differentiable policy search (DNAS) and the methods built on it (SEAM, ASGA).

Checks the schedule, learning rates and decays (>= 0), the budget (a positive number of BitOps, or
the cost of uniform b x b bits per MAC with b between the smallest and largest supported width, 2.5
allowed; and/or a positive size in MB; the share of it a fitted policy fills, in [0, 1]), the
complexity penalty (framework.quant.cost's PENALTIES; `hinge` needs a BitOps budget), the margin
term, the two-pass rule and the supernet's quantizers.
"""

from pydantic import model_validator

from framework.config.quant import QuantConfig, supported_bits
from framework.config.sharpness import SharpnessConfig
from framework.config.types import Flag, Schema, Text, between, number, number_in, one_of, sentence, whole


def _penalties() -> tuple[str, ...]:
    from framework.quant.cost import PENALTIES

    return PENALTIES


class ComplexityConfig(Schema):
    """`search.complexity`: lambda_c and the penalty of the expected BitOps, or (`mode=dual`) the
    budget as a constraint with a Lagrange multiplier (its start and dual-ascent rate)."""

    weight: number(0)
    penalty: one_of(_penalties)
    mode: one_of(("penalty", "dual", "dual_target"))
    dual_lr: number(0)
    lambda_init: number(0)


class MarginConfig(Schema):
    """`search.margin`: SEAM's large-margin term (weight 0: off)."""

    weight: number(0)
    margin: number(0)
    momentum: between(0, 1)


class SearchConfig(Schema):
    """The search: schedule, optimizers of weights and logits, budget, penalty, margin, rule, supernet."""

    method: Text
    epochs: whole(1)
    max_steps: whole(1) | None
    batch_size: whole(1) | None
    lr_weights: number(0)
    lr_logits: number(0)
    logit_optimizer: one_of(("sgd", "adam"))
    momentum: between(0, 1)
    weight_decay: number(0)
    logit_weight_decay: number(0)
    warmup_steps: whole(0)
    head: one_of(("auto", "fresh"))
    gumbel_tau_final: number(0, strict=True) | None
    budget_bitops: number(0, strict=True) | None
    budget_uniform_bits: number_in(supported_bits) | None
    budget_size_mb: number(0, strict=True) | None
    budget_fill: between(0, 1)
    repair: Flag
    complexity: ComplexityConfig
    margin: MarginConfig
    sharpness: SharpnessConfig
    quant: QuantConfig

    @model_validator(mode="after")
    def _v2_options(self):
        if self.complexity.mode != "penalty" and self.budget_bitops is None and self.budget_uniform_bits is None:
            raise sentence(f"search.complexity.mode={self.complexity.mode} needs a BitOps budget: set search.budget_bitops or "
                           "search.budget_uniform_bits (or search.complexity.mode=penalty)")
        if self.gumbel_tau_final is not None and not self.quant.gumbel_tau:
            raise sentence(f"search.gumbel_tau_final={self.gumbel_tau_final} anneals the Gumbel temperature: set "
                           f"search.quant.gumbel_tau (its start) too, or drop it")
        return self

    @model_validator(mode="after")
    def _hinge_needs_a_budget(self):
        if self.complexity.penalty == "hinge" and self.budget_bitops is None and self.budget_uniform_bits is None:
            raise sentence("search.complexity.penalty=hinge needs a BitOps budget: set search.budget_bitops or "
                           "search.budget_uniform_bits (or search.complexity.penalty=linear)")
        return self
