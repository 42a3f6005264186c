"""What a study runs: one run per row and seed, each a list of stages with the config it composes.

A run's config is composed by Hydra from conf/ with, in order: `study.overrides`, the row's overrides,
the row's `search=<method>` and `proxy=<name>`, the study command's own overrides (minus the
`study*`, `launcher*` and `hydra.*` ones: what the command line says wins, so `mpq study study=<name>
finetune.max_steps=2` shortens every run), and `seed=<seed>`. The pretraining takes `study.overrides`,
`study.pretrain`, the command's overrides and `seed`. The search (if the row has one), the
fine-tuning, the evaluation and the landscape each run in their own folder of the run:

    <study>/pretrain/                     the full-precision checkpoint (unless study.init_checkpoint)
    <study>/runs/<row>/seed<k>/search/    policy.json (searched rows)
                                  finetune/   the quantized checkpoint
                                  evaluate/   top-1 on the target's test split
                                  landscape/  Hessian eigenvalue, surrogate gap, 1-D curve
                                  run.json    the run's numbers, written last: the run is finished
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.config import validate_config
from framework.errors import MPQError
from framework.paths import CONF_DIR

#: the override keys of the study command that are the study's own, not its runs'
STUDY_KEYS = ("study", "launcher", "hydra", "stage", "resume")


@dataclass(frozen=True)
class Run:
    """One row at one seed: its folder, the overrides of its stages, and where its policy comes from."""

    row: str
    seed: int
    dir: Path
    overrides: tuple[str, ...]
    policy: str | None  # a policy spec, or None when the run searches its own
    searches: bool

    @property
    def key(self) -> str:
        return f"{self.row}/{self.seed}"


@dataclass
class StudyPlan:
    name: str
    dir: Path
    pretrain_overrides: tuple[str, ...]
    init_checkpoint: str | None
    runs: list[Run] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    @property
    def pretrain_dir(self) -> Path:
        return self.dir / "pretrain"

    def fp_checkpoint(self) -> str:
        return self.init_checkpoint or str(self.pretrain_dir / "checkpoints" / "last")

    def find(self, key: str) -> Run:
        for run in self.runs:
            if run.key == key:
                return run
        raise MPQError(f"study.only={key} names no run of study {self.name}; runs are <row>/<seed>, e.g. {self.runs[0].key}")


def command_overrides() -> list[str]:
    """The study command's own overrides that its runs inherit (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in STUDY_KEYS]


def seeded_policy(spec: str, seed: int) -> str:
    """A row's policy at one seed: `random` is `random:<seed>`, `random+<n>` is `random:<seed + n>` (a
    second random policy per seed); any other spec is the same at every seed."""
    if spec == "random":
        return f"random:{seed}"
    if spec.startswith("random+"):
        offset = spec.split("+", 1)[1]
        if not offset.isdigit():
            raise MPQError(f"study row policy {spec} is malformed; write random+<n> with a whole number n, e.g. random+100")
        return f"random:{seed + int(offset)}"
    return spec


def plan_study(cfg: DictConfig, study_dir: Path) -> StudyPlan:
    """Every run of `cfg.study`: the rows at the first seed (in their order), then at the next seed, ..."""
    scfg = cfg.study
    inherited = command_overrides()
    shared = list(scfg.overrides)
    plan = StudyPlan(str(scfg.name), study_dir, tuple([*shared, *scfg.pretrain, *inherited, f"seed={int(cfg.seed)}"]),
                     str(scfg.init_checkpoint) if scfg.init_checkpoint else None)
    for node in scfg.rows:
        row = OmegaConf.to_container(node, resolve=True)  # optional keys may be absent
        row_overrides = [*shared, *row.get("overrides", [])]
        if row.get("search"):
            row_overrides.append(f"search={row['search']}")
        if row.get("proxy"):
            row_overrides.append(f"proxy={row['proxy']}")
        row_overrides.extend(inherited)
        plan.rows.append(row)
        for seed in scfg.seeds:
            policy = None
            if row.get("policy"):
                policy = seeded_policy(str(row["policy"]), int(seed))
            plan.runs.append(Run(str(row["name"]), int(seed), study_dir / "runs" / str(row["name"]) / f"seed{int(seed)}",
                                 tuple([*row_overrides, f"seed={int(seed)}"]), policy, bool(row.get("search"))))
    # seed-major: every row at the first seed before any at the second, so a study cut short has all its rows
    order = {int(seed): i for i, seed in enumerate(scfg.seeds)}
    plan.runs.sort(key=lambda run: order[run.seed])  # stable: rows keep their order within a seed
    return plan


def compose_stage(stage: str, overrides: tuple[str, ...] | list[str], run_dir: Path, **updates) -> DictConfig:
    """The config `mpq <stage> <overrides>` would run in `run_dir`, validated, with `updates` set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict

    names = [*overrides, f"stage={stage}"]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose("config", overrides=names)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=names)
    except HydraException as err:
        raise MPQError(f"a study run's overrides do not compose ({' '.join(overrides)}): {str(err).splitlines()[0]}") from None
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    validate_config(cfg)
    return cfg
