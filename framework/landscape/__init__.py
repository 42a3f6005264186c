"""Loss-landscape diagnostics of a trained (quantized) network, on a loss over fixed batches:

- :mod:`~framework.landscape.hessian`: the largest eigenvalue of the Hessian over the weights
  (power iteration on Hessian-vector products);
- :mod:`~framework.landscape.gap`: the surrogate gap `L(w + rho g/||g||) - L(w)`;
- :mod:`~framework.landscape.curve`: the 1-D loss curve along a filter-normalised random direction;
- :mod:`~framework.landscape.params`: which parameters (the weights, not quantizer steps or search
  logits), the loss closure, evaluation mode, vectors of tensors;
- :mod:`~framework.landscape.batches`: mean cross-entropy over fixed batches drawn from a seed;
- :mod:`~framework.landscape.trace`: per-layer Hessian traces over a layer's weight and its input
  (Hutchinson's estimator);
- :mod:`~framework.landscape.sensitivity`: what quantizing one layer costs the full-precision model
  (HAWQ's trace-weighted errors, single-layer loss increases), the scores of `policy=hawq` and
  `policy=sensitivity`.

Every function takes the model, a loss closure (`loss(model)` yields terms summing to `L(w)`) and the
list of parameters; `mpq landscape` (framework.stages.landscape) runs the three on a checkpoint.
"""

from framework.landscape.batches import CrossEntropyOnBatches, fixed_batches
from framework.landscape.curve import LossCurve, filter_normalized_direction, loss_curve
from framework.landscape.gap import SurrogateGap, surrogate_gap
from framework.landscape.hessian import TopEigenvalue, hessian_vector_product, top_hessian_eigenvalue
from framework.landscape.params import LossTerms, evaluation, gradient, landscape_parameters, loss_value
from framework.landscape.sensitivity import (
    HawqSensitivity,
    LossSensitivity,
    hawq_sensitivity,
    loss_sensitivity,
)
from framework.landscape.trace import LayerTraces, TraceEstimate, hutchinson_traces, layer_traces

__all__ = [
    "CrossEntropyOnBatches",
    "HawqSensitivity",
    "LayerTraces",
    "LossSensitivity",
    "LossCurve",
    "LossTerms",
    "SurrogateGap",
    "TopEigenvalue",
    "TraceEstimate",
    "evaluation",
    "filter_normalized_direction",
    "fixed_batches",
    "gradient",
    "hawq_sensitivity",
    "hessian_vector_product",
    "hutchinson_traces",
    "landscape_parameters",
    "layer_traces",
    "loss_curve",
    "loss_sensitivity",
    "loss_value",
    "surrogate_gap",
    "top_hessian_eigenvalue",
]
