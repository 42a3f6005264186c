"""Sharpness-aware optimisation: one two-pass mechanism, many rules (SAM, ASAM, SAQ, ASGA)."""

from framework.sharpness.rules import ASAM, ASGA, SAM, adaptive_radius, build_rule
from framework.sharpness.two_pass import EngineTwoPass, TwoPassOptimizer

__all__ = ["ASAM", "ASGA", "EngineTwoPass", "SAM", "TwoPassOptimizer", "adaptive_radius", "build_rule"]
