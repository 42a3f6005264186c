"""The config's schemas: one typed schema per config group, validated once after composition.

Values (the defaults) live only in conf/; a schema holds what a value may be: its type, range and
allowed values, the latter from the registries that own them (models, datasets, quantizers,
sharpness rules, FFCV options). One module per group, mirroring conf/:

- :mod:`framework.config.data`: `data` and `proxy` (one schema)
- :mod:`framework.config.model`, :mod:`framework.config.train`, :mod:`framework.config.finetune`,
  :mod:`framework.config.quant` (`quant` and `search.quant`), :mod:`framework.config.search`,
  :mod:`framework.config.sharpness` (`search.sharpness`, `finetune.sharpness`),
  :mod:`framework.config.landscape`, :mod:`framework.config.sensitivity`,
  :mod:`framework.config.tune`, :mod:`framework.config.tracking`, :mod:`framework.config.launcher`,
  :mod:`framework.config.dist`
- :mod:`framework.config.root`: the root keys (seed, device, threads, checkpoint_every, resume,
  pipeline, prepare, ...), the groups, the checks across groups
- :mod:`framework.config.types`: the strict base model and the value types
- :mod:`framework.config.validate`: :func:`validate_config`, the one call (launchers/cli.py after
  Hydra composed the config; framework/tune/plan.py for each trial's config)

Importing this package imports no registry: allowed values are looked up when a config is validated.
The registries never import this package.
"""

from framework.config.root import RootConfig
from framework.config.validate import validate_config

__all__ = ["RootConfig", "validate_config"]
