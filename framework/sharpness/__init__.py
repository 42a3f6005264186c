"""Sharpness-aware optimisation: one two-pass mechanism, many rules (SAM, ASAM, SAQ, ASGA)."""

from framework.sharpness.perturbation import Perturbation, is_perturbed
from framework.sharpness.rules import ASAM, ASGA, SAM, adaptive_radius, build_rule
from framework.sharpness.two_pass import EngineTwoPass, TwoPassOptimizer

__all__ = ["ASAM", "ASGA", "SAM", "EngineTwoPass", "Perturbation", "TwoPassOptimizer", "adaptive_radius",
           "build_rule", "is_perturbed"]
