"""`quant` (fine-tuning's and evaluation's quantizers) and `search.quant` (the supernet's).

Quantizer names and bit-widths come from framework.quant.quantizers (WEIGHT_QUANTIZERS,
ACT_QUANTIZERS, SUPPORTED_BITS): the weight and activation quantizers, the fixed first/last
layers' bits (a supported width, `searched` or null), the candidate bit lists, the initial
learned range (> 0) and logits, the Gumbel temperature (> 0 or null), `joint_wa` needing the
same weight and activation candidates, the LSQ activations' initialisation and the kernel backend
(framework.quant.kernels.CHOICES; the search's follows `quant.kernels`).
"""

from typing import Any

from pydantic import field_validator, model_validator

from framework.config.types import Flag, Schema, Text, invalid, list_of, number, one_of


def _weight_quantizers() -> tuple[str, ...]:
    from framework.quant.quantizers import WEIGHT_QUANTIZERS

    return WEIGHT_QUANTIZERS


def _act_quantizers() -> tuple[str, ...]:
    from framework.quant.quantizers import ACT_QUANTIZERS

    return ACT_QUANTIZERS


def _kernel_choices() -> tuple[str, ...]:
    from framework.quant.kernels import CHOICES

    return CHOICES


def _act_inits() -> tuple[str, ...]:
    from framework.quant.quantizers import ACT_INITS

    return ACT_INITS


def supported_bits() -> tuple[int, ...]:
    from framework.quant.quantizers import SUPPORTED_BITS

    return SUPPORTED_BITS


class QuantConfig(Schema):
    """A quantizer node: what quantizes weights and activations, at which candidate bit-widths."""

    name: Text
    weight: one_of(_weight_quantizers)
    activation: one_of(_act_quantizers)
    per_channel: Flag
    act_init_range: number(0, strict=True)
    fixed_bits: Any
    candidates_w: list_of(supported_bits, "bit-width")
    candidates_a: list_of(supported_bits, "bit-width")
    alpha_init: number(0)
    gumbel_tau: number(0, strict=True) | None
    joint_wa: Flag
    kernels: one_of(_kernel_choices)
    act_init: one_of(_act_inits)

    @field_validator("fixed_bits", mode="plain")
    @classmethod
    def _fixed_bits(cls, value: Any) -> Any:
        if value is None or value == "searched" or (not isinstance(value, bool) and value in supported_bits()):
            return value
        raise invalid(f"expected a bit-width from {list(supported_bits())}, or null (searched like the other layers)")

    @model_validator(mode="after")
    def _joint_candidates(self):
        if self.joint_wa and sorted(set(self.candidates_w)) != sorted(set(self.candidates_a)):
            raise invalid(f"joint_wa=true needs candidates_a equal to candidates_w {self.candidates_w}",
                          "candidates_a", self.candidates_a)
        return self
