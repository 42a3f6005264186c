"""Bit-width policies: the policy file (:mod:`~framework.policy.schema`) and per-layer bits from a
search or a baseline (:mod:`~framework.policy.bits`)."""

from framework.policy.bits import derive_bits, parse_uniform, random_bits, repair, uniform_bits
from framework.policy.schema import (
    SCHEMA,
    Budget,
    CostAt,
    LayerPolicy,
    Policy,
    check_budget,
    cost_at,
    make_policy,
    policy_from_dict,
    read_policy,
    validate_policy,
    write_policy,
)

__all__ = [
    "Budget",
    "check_budget",
    "cost_at",
    "CostAt",
    "derive_bits",
    "LayerPolicy",
    "make_policy",
    "parse_uniform",
    "Policy",
    "policy_from_dict",
    "random_bits",
    "read_policy",
    "repair",
    "SCHEMA",
    "uniform_bits",
    "validate_policy",
    "write_policy",
]
