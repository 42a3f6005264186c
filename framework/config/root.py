"""The whole config: the root keys of conf/config.yaml and one schema per group, plus the checks
across groups (several processes only for the training stages, and the pipeline's with `launcher=ray`; ZeRO stage 3 refused as
framework.dist.engine.check_zero_stage says).

`tune` and `launcher` are absent from a sweep trial's config (framework.tune.plan drops them), so
they may be missing; every other key must be there.
"""

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from framework.config.data import DataConfig
from framework.config.dist import DistConfig
from framework.config.export import ExportConfig
from framework.config.finetune import FinetuneConfig
from framework.config.landscape import LandscapeConfig
from framework.config.launcher import LocalLauncher, RayLauncher, SlurmLauncher
from framework.config.model import ModelConfig
from framework.config.quant import QuantConfig
from framework.config.search import SearchConfig
from framework.config.sensitivity import SensitivityConfig
from framework.config.study import StudyConfig
from framework.config.tracking import TrackingConfig
from framework.config.train import TrainConfig
from framework.config.tune import TuneConfig
from framework.config.types import Flag, Schema, Text, invalid, list_of, sentence, whole

#: the stages that train through the DeepSpeed engine, on `dist.nproc` processes
TRAINING_STAGES = ("pretrain", "finetune")


def _splits() -> tuple[str, ...]:
    from framework.data.beton import SPLITS

    return SPLITS


class PipelineConfig(Schema):
    """`pipeline`: a fixed policy instead of the search, or a sweep instead of it; the uniform
    baseline within the same budget fine-tuned beside the searched policy; the export of the result."""

    policy: Text | None
    sweep: Flag
    baseline: Flag
    export: Flag
    seeds: whole(1)


class PrepareConfig(Schema):
    """`prepare`: which splits `mpq prepare` writes, the proxy's too, rewriting or not."""

    splits: list_of(_splits, "split")
    proxy: Flag
    force: Flag


class RootConfig(Schema):
    """Every key of a composed config, the groups validated by their own schemas."""

    stage: Text
    experiment_name: Text
    seed: whole(0)
    device: Text
    threads: whole(1) | None
    run_dir: Text | None
    checkpoint: Text | None
    init_checkpoint: Text | None
    policy: Text | None
    input_size: whole(1) | None
    in_channels: whole(1)
    num_classes: whole(1) | None
    resume: Flag
    checkpoint_every: whole(0)
    pipeline: PipelineConfig
    prepare: PrepareConfig
    data: DataConfig
    proxy: DataConfig
    model: ModelConfig
    train: TrainConfig
    quant: QuantConfig
    search: SearchConfig
    finetune: FinetuneConfig
    landscape: LandscapeConfig
    sensitivity: SensitivityConfig
    export: ExportConfig
    tracking: TrackingConfig
    tune: TuneConfig | None = None  # absent from a sweep trial's config only
    launcher: Annotated[LocalLauncher | SlurmLauncher | RayLauncher, Field(discriminator="name")] | None = None  # likewise
    dist: DistConfig
    study: StudyConfig | None = None  # `mpq study study=<name>` only

    @field_validator("device", mode="after")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise invalid("expected auto, cpu, cuda or cuda:<index>") from None
        return value

    @model_validator(mode="after")
    def _processes(self):
        ray_pipeline = self.stage == "pipeline" and self.launcher is not None and self.launcher.name == "ray"
        if self.dist.nproc > 1 and self.stage not in TRAINING_STAGES and not ray_pipeline:
            raise sentence(f"dist.nproc={self.dist.nproc} applies to pretrain and finetune; {self.stage} runs on one "
                           f"process (parallel searches: slurm/search_array.sbatch); drop dist.nproc")
        per_node = getattr(self.launcher, "workers_per_node", None)
        if per_node not in (None, 1, self.dist.nproc):
            raise sentence(f"launcher.workers_per_node={per_node}: Ray Train can hold 1 worker per node (STRICT_SPREAD) or "
                           f"all dist.nproc={self.dist.nproc} on one node (STRICT_PACK); set 1, {self.dist.nproc} or null "
                           f"(launcher.placement_strategy then decides)")
        if self.search.quant.kernels != self.quant.kernels:
            raise sentence(f"search.quant.kernels={self.search.quant.kernels} differs from quant.kernels="
                           f"{self.quant.kernels}: one backend runs per process; set quant.kernels alone")
        if self.dist.zero_stage == 3 and self.stage in (*TRAINING_STAGES, "pipeline"):
            from framework.dist.engine import check_zero_stage  # raises the one-line MPQError

            check_zero_stage(3, two_pass=self.stage != "pretrain" and self.finetune.sharpness.name != "none")
        return self
