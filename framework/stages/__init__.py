"""The registry of stages: one entry per `mpq <stage>`, read by the command, its `--help`, its
errors, the launchers and the tests.

Each stage is a plain function `run_<stage>(cfg) -> Result` (DESIGN.md). The functions of the
stages that are stage glue live in this package, one module each; the search and the sweep keep
their bodies in :mod:`framework.search.loop` and :mod:`framework.tune.sweep`, which a sweep's
trials also call. Entries name their function as `module:attribute` and import it only when the
stage runs, so `mpq --help` and the command's errors do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from framework.errors import MPQError


@dataclass(frozen=True)
class Stage:
    """A stage of the `mpq` command: its name, where its function lives, one line of help,
    whether `dist.nproc > 1` starts several processes for it (training stages only), and whether it
    submits its own runs with `launcher=slurm` (its function then takes `launch=`) instead of
    running as one Slurm job."""

    name: str
    target: str
    help: str
    distributed: bool = False
    dispatches: bool = False

    @property
    def function(self) -> Callable:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


#: every stage, in pipeline order
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("prepare", "framework.stages.prepare:run_prepare",
          "write FFCV .beton files of the data (and proxy) for data.loader=ffcv"),
    Stage("pretrain", "framework.stages.pretrain:run_pretrain",
          "train the full-precision model on the target data", distributed=True),
    Stage("search", "framework.search.loop:run_search", "search a mixed-precision policy on the proxy data"),
    Stage("sweep", "framework.tune.sweep:run_sweep",
          "run many proxy searches (Ray Tune) and pick the policy under a budget"),
    Stage("finetune", "framework.stages.finetune:run_finetune",
          "quantization-aware fine-tuning of the target model under a policy", distributed=True),
    Stage("evaluate", "framework.stages.evaluate:run_evaluate", "top-1 of a checkpoint on the target's test split"),
    Stage("landscape", "framework.stages.landscape:run_landscape",
          "Hessian top eigenvalue, surrogate gap and 1-D loss curve of a checkpoint"),
    Stage("export", "framework.stages.export:run_export",
          "a fine-tuned checkpoint as bit-packed safetensors and ONNX (QDQ), with a parity check"),
    Stage("cost", "framework.stages.cost:run_cost", "MACs, BitOps and size of a model under a policy, without data"),
    Stage("pipeline", "framework.pipeline:run_pipeline", "pretrain, search (or sweep), finetune, evaluate, with a summary"),
    Stage("study", "framework.study.run:run_study",
          "every row and seed of a transfer study (study=<name>), then study.json and study.md", dispatches=True),
)}


def get_stage(name: str) -> Stage:
    """The registered stage `name`, or one error listing the stages there are."""
    try:
        return STAGES[name]
    except KeyError:
        raise MPQError(f"unknown stage '{name}'; choose one of: {', '.join(STAGES)}") from None


def run_stage(name: str, cfg) -> object:
    """Run the stage `name` on `cfg` in this process."""
    return get_stage(name).function(cfg)
