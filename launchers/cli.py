"""The `mpq` command: `mpq <stage> [hydra overrides...]`.

The first argument picks the stage; everything after it is Hydra's (overrides, `--multirun`,
`--help`, `--cfg job`). The stages come from one registry (:data:`framework.stages.STAGES`); the
command only composes the config and calls the stage's function; no training logic lives here. User errors print one line,
`mpq <stage>: error: ...`, leave a `result.json` with `status: error` in the run directory and exit
with status 2.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path

from framework.paths import CONF_DIR
from framework.stages import STAGES, get_stage

USAGE = (
    "usage: mpq <stage> [key=value ...] [--multirun] [--help]\n\n"
    "stages:\n" + "\n".join(f"  {stage.name:<10}{stage.help}" for stage in STAGES.values()) + "\n\n"
    "examples:\n"
    "  mpq pipeline                                  the default run (Fashion-MNIST target)\n"
    "  mpq pretrain model=resnet20 train.epochs=5    override any config value\n"
    "  mpq evaluate checkpoint=outputs/pretrain/<run>/checkpoints/last\n"
    "  mpq pretrain --help                           the stage's config and groups (Hydra)\n"
)

_GROUP_OVERRIDE = re.compile(r"^[+~]{0,2}(?P<group>[a-z_]+)=(?P<value>[^=]*)$")
_SWEEP_SYNTAX = re.compile(r"[()\[\]{}*$]")


def _config_groups() -> dict[str, list[str]]:
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_"))  # _base: not a choice
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def check_group_choices(overrides: list[str]) -> str | None:
    """One line naming an unknown config-group option (`model=resnet9`), or None if all exist."""
    groups = _config_groups()
    for item in overrides:
        match = _GROUP_OVERRIDE.match(item)
        if not match or match["group"] not in groups or _SWEEP_SYNTAX.search(match["value"]):
            continue
        for value in filter(None, match["value"].split(",")):
            if value != "null" and value not in groups[match["group"]]:
                close = difflib.get_close_matches(value, groups[match["group"]], n=1, cutoff=0.6)
                hint = f"did you mean '{match['group']}={close[0]}'? " if close else ""
                return (
                    f"unknown {match['group']} '{value}'; {hint}choose one of: {', '.join(groups[match['group']])}"
                    f" (config files in conf/{match['group']}/)"
                )
    return None


def _dotted_keys(node, prefix: str = "") -> list[str]:
    """Every key of a composed config as a dotted path (`train.epochs`), intermediate nodes included."""
    from omegaconf import DictConfig

    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else ():
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            keys.extend(_dotted_keys(child, path + "."))
    return keys


def _closest_key(key: str, known: list[str]) -> str | None:
    """The known dotted key a mistyped one most probably meant: the closest full path
    (`train.epochz` -> `train.epochs`), else the path whose last part is closest to the key's last
    part (`epochs` -> `train.epochs`)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_leaf: dict[str, str] = {}
    for path in sorted(known, key=lambda p: p.count(".")):  # the shallowest path of each leaf name
        by_leaf.setdefault(path.rsplit(".", 1)[-1], path)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See https")]
    return "; ".join(lines[:2]) or type(err).__name__


def check_overrides(stage: str, overrides: list[str]) -> str | None:
    """One line naming what is wrong with the command line's overrides, or None: bad override syntax
    (Hydra's grammar), a key the config does not have (with the key probably meant) or any other
    reason Hydra cannot compose the config from them. A sweep (`a=1,2`, `range(...)`) is checked
    with its first value; `hydra.*` overrides are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    parsed = []
    for item in overrides:
        try:
            (override,) = parser.parse_overrides([item])
        except HydraException as err:
            return f"cannot parse the override '{item}' ({_first_line(err.__cause__ or err)}); write key=value, quoting values with spaces or brackets"
        if not override.key_or_group.startswith("hydra"):
            parsed.append(override)

    def single(override) -> str:
        """The override with a sweep replaced by its first value (`lr=0.1,0.2` -> `lr=0.1`)."""
        if override.type == OverrideType.DEL and override.value() is None:
            return override.get_key_element()
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()), "")
        else:
            value = override.get_value_element_as_str()
        return f"{override.get_key_element()}={value}"

    groups = _config_groups()
    group_overrides = [single(o) for o in parsed if o.key_or_group.split("/")[0] in groups]
    key_overrides = [o for o in parsed if o.key_or_group.split("/")[0] not in groups]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose("config", overrides=[*group_overrides, f"stage={stage}"])
            known = _dotted_keys(base)
            for override in key_overrides:
                if override.type != OverrideType.CHANGE or override.package is not None:
                    continue
                key = override.key_or_group
                if OmegaConf.select(base, key, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
                    meant = _closest_key(key, known)
                    hint = f"did you mean '{meant}'? " if meant else ""
                    return (f"unknown key '{key}' in the override '{override.input_line}'; {hint}"
                            f"`mpq {stage} --cfg job` prints every key (+{key}=... adds a new one)")
            compose("config", overrides=[*group_overrides, *(single(o) for o in key_overrides), f"stage={stage}"])
    except (HydraException, OmegaConfBaseException) as err:
        return f"cannot apply the overrides ({_first_line(err)})"
    finally:
        GlobalHydra.instance().clear()
    return None


_ABSENT = object()


_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun"}
_HYDRA_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_hydra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides, so that they can be passed flags first:
    Hydra's parser takes the overrides as one positional list, which a flag may not interrupt."""
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            takes_value = arg in _HYDRA_VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(args)
                                                         and args[i + 1] in _HYDRA_INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        i += 1
    return flags, overrides


def _task(cfg) -> None:
    """Hydra's task: resolve the run directory, check the config, run the stage (or start the
    processes that run it: `dist.nproc`, `launcher=slurm`)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from framework.config import validate_config
    from framework.dist.ranks import current_ranks
    from framework.errors import MPQError
    from framework.results import write_stopped_result
    from framework.train.resume import Interrupted

    stage = str(cfg.stage)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ranks = current_ranks()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)

    def fail(status: str, message: str, code: int, **extra) -> None:
        write_stopped_result(run_dir, stage, status, message, cfg, ranks.rank, **extra)
        if ranks.is_main:  # one line on the terminal: rank 0's; the others leave theirs in the run directory
            print(f"mpq {stage}: {'error: ' if status == 'error' else ''}{message}", file=sys.stderr)
        sys.exit(code)

    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        validate_config(cfg)
        if cfg.launcher.name == "slurm" and _inside_hydra_slurm_job():
            with open_dict(cfg):  # Hydra's submitit launcher ran this sweep point as a Slurm job
                cfg.resume = True  # a requeued job continues from its checkpoint
        elif cfg.launcher.name == "slurm" and get_stage(stage).dispatches:
            from launchers.slurm import submit_runs

            overrides = list(HydraConfig.get().overrides.task)
            get_stage(stage).function(cfg, launch=lambda jobs: submit_runs(cfg, stage, overrides, jobs, main))
            return
        elif cfg.launcher.name == "slurm":
            from launchers.slurm import submit_stage

            submit_stage(cfg, stage, list(HydraConfig.get().overrides.task), run_dir, main)
            return
        elif cfg.launcher.name == "ray":
            from launchers.ray_train import submit_stage as submit_to_ray

            submit_to_ray(cfg, stage, run_dir)
            return
        from framework.dist.launch import should_spawn, spawn_local

        if should_spawn(cfg):
            _report_workers(stage, run_dir, spawn_local(cfg, stage, list(HydraConfig.get().overrides.task), run_dir), fail)
            return
        get_stage(stage).function(cfg)
    except Interrupted as err:
        fail("interrupted", str(err), 143, artifacts={"checkpoint": str(err.checkpoint)}, step=err.step)
    except MPQError as err:
        fail("error", str(err), 2, **getattr(err, "details", {}))
    except KeyboardInterrupt:
        print(f"mpq {stage}: interrupted", file=sys.stderr)
        sys.exit(130)


def _inside_hydra_slurm_job() -> bool:
    """True inside a `--multirun` job that Hydra's submitit launcher submitted."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _report_workers(stage: str, run_dir: Path, failure: str | None, fail) -> None:
    """After `dist.nproc` workers ended: exit as rank 0's result.json says (it printed its own error);
    where rank 0 could not say (stopped first, or no result), `fail` writes the launcher's line to
    result.json and the terminal."""
    import json

    result_path = run_dir / "result.json"
    try:
        status = json.loads(result_path.read_text()).get("status")
    except (OSError, ValueError):
        status = None
    if failure is None and status == "ok":
        return
    if status == "interrupted":
        sys.exit(143)
    if status != "error":  # rank 0 did not explain it: say what the launcher saw
        notes = sorted(run_dir.glob("rank*.error"))
        detail = f"; {notes[0].name}: {notes[0].read_text().strip()}" if notes else ""
        fail("error", f"{failure or 'the workers ended without a result'}{detail}", 2)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"mpq: error: unknown stage '{stage}'; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    flags, overrides = split_hydra_args(rest)
    problem = check_group_choices(overrides) or check_overrides(stage, overrides)
    if problem:
        print(f"mpq {stage}: error: {problem}", file=sys.stderr)
        return 2

    import hydra

    sys.argv = [f"mpq {stage}", *flags, *overrides, f"stage={stage}"]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
