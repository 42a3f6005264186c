"""Bit-width policies: the policy file (:mod:`~framework.policy.schema`), per-layer bits from a
search or a baseline (:mod:`~framework.policy.bits`), the budget from the config
(:mod:`~framework.policy.budget`) and the exact fit of a policy to it, by probabilities or by given scores
(:mod:`~framework.policy.knapsack`)."""

from framework.policy.bits import (
    derive_bits,
    draw_bits,
    parse_random,
    parse_uniform,
    random_bits,
    uniform_bits,
    uniform_budget_bits,
    uniform_frontier,
)
from framework.policy.budget import BudgetLimits, budget_from_config, uniform_budget_bitops
from framework.policy.knapsack import (
    DEFAULT_FILL,
    check_budget_reachable,
    fit_scores_to_budget,
    fit_to_budget,
    log_probability,
)
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
    "BudgetLimits",
    "budget_from_config",
    "check_budget",
    "check_budget_reachable",
    "cost_at",
    "CostAt",
    "DEFAULT_FILL",
    "derive_bits",
    "draw_bits",
    "fit_scores_to_budget",
    "fit_to_budget",
    "LayerPolicy",
    "log_probability",
    "make_policy",
    "parse_random",
    "parse_uniform",
    "Policy",
    "policy_from_dict",
    "random_bits",
    "read_policy",
    "SCHEMA",
    "uniform_bits",
    "uniform_budget_bitops",
    "uniform_budget_bits",
    "uniform_frontier",
    "validate_policy",
    "write_policy",
]
