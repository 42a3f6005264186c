"""The stage layer: what every stage shares, below the stages themselves.

- :mod:`~framework.stage.setup`: run directory, threads, seeds, device, sub-configs;
- :mod:`~framework.stage.models`: the model from the config or from a checkpoint (geometry, classes,
  quantized under its own policy or `policy=`);
- :mod:`~framework.stage.policies`: a policy from its specification, applied and calibrated;
- :mod:`~framework.stage.finish`: `result.json`.

The stages (:mod:`framework.stages`), the search and the sweep import from here; nothing here
imports a stage, the search, the sweep or the pipeline.
"""

from framework.stage.finish import distribution_record, finish_stage
from framework.stage.models import (
    build_model,
    check_classes,
    checkpoint_geometry,
    checkpoint_model,
    data_config_at,
    full_precision_reference,
    load_full_precision_checkpoint,
    model_from_checkpoint,
    model_meta,
)
from framework.stage.policies import (
    Geometry,
    Reference,
    calibrate,
    quant_meta,
    quantize_with_policy,
    resolve_policy,
)
from framework.stage.setup import run_directory, set_threads, start_stage, sub_config

__all__ = [
    "Geometry",
    "build_model",
    "calibrate",
    "check_classes",
    "checkpoint_geometry",
    "checkpoint_model",
    "data_config_at",
    "distribution_record",
    "finish_stage",
    "full_precision_reference",
    "load_full_precision_checkpoint",
    "model_from_checkpoint",
    "model_meta",
    "quant_meta",
    "quantize_with_policy",
    "Reference",
    "resolve_policy",
    "run_directory",
    "set_threads",
    "start_stage",
    "sub_config",
]
