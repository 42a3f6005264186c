"""mpq-framework: generalizable mixed-precision quantization at scale.

Search per-layer bit-width policies on a small proxy dataset with sharpness-aware, gradient-aligned
optimisation (ASGA, SEAM, SAQ), then fine-tune the transferred policy on the target dataset.
"""

from framework.env import configure_environment

__version__ = "0.1.0"

configure_environment()
