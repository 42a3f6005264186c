"""The shell commands of README.md and of the documentation pages (docs/**/*.md) run as written.

Convention: a fenced code block whose info string is `bash` and whose opening fence is on the line
right after the HTML comment `<!-- runnable -->` is *runnable*. Every command in it must finish in
seconds without data, a checkpoint or a cluster (`mpq --help`, `mpq <stage> --help`,
`mpq cost ...`); each one is run here through the shell, in a temporary folder with the venv's
`bin/` first on PATH, and must exit with status 0. Mark only such blocks; blocks of long commands
(training, clusters, `make run`) stay unmarked. Use a `text` block for usage patterns.

Every other command of a `bash` block is checked without running it:

- `mpq <stage> ...`: the stage exists, its config-group options exist
  (`launchers.cli.check_group_choices`), the overrides compose with Hydra and the composed config
  passes its schema (`framework.config.validate_config`); a command with Hydra flags (`--multirun`,
  `--cfg`) is checked as the command checks it (`launchers.cli.check_overrides`), a sweep at its
  first values.
  A command with a placeholder (`<run>`, `...`) is a pattern: in the docs it is skipped, and
  README.md may not have one, since every command there must run as written.
- `make <target>`: the target is one of the Makefile's.

Lines are joined at a trailing backslash and read with shell quoting; `#` starts a comment. Last,
the README's stage table links a page for every registered stage and its configuration table has a
row for every config group of conf/.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from framework.paths import REPO_ROOT

RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^(?P<indent> {0,3})```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S)
PLACEHOLDER = re.compile(r"<[^<>\s]*>|\.\.\.|…")
VENV_BIN = REPO_ROOT / ".venv" / "bin"


def documents() -> list[Path]:
    """README.md and the hand-written pages of the site (not the reports `mpq study` writes)."""
    pages = sorted(p for p in (REPO_ROOT / "docs").rglob("*.md") if "study" not in p.relative_to(REPO_ROOT / "docs").parts)
    return [REPO_ROOT / "README.md", *pages]


def commands(path: Path) -> list[tuple[str, str, bool]]:
    """(where, command, runnable) for every command of every `bash` block of `path`."""
    text = path.read_text()
    found = []
    for block in FENCE.finditer(text):
        if block["info"].strip() != "bash":
            continue
        before = text[:block.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        runnable = before == RUNNABLE
        line = text.count("\n", 0, block.start("body")) + 1
        pending, start = "", line
        for offset, raw in enumerate(block["body"].splitlines()):
            if not pending:
                start = line + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            command, pending = (pending + raw).strip(), ""
            if command and not command.startswith("#"):
                found.append((f"{path.relative_to(REPO_ROOT)}:{start}", command, runnable))
    return found


ALL = [entry for path in documents() for entry in commands(path)]


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def test_the_documents_have_runnable_commands():
    """The convention is in use: the README and the docs each mark some cheap commands runnable."""
    assert any(runnable for where, _, runnable in ALL if where.startswith("README.md"))
    assert any(runnable for where, _, runnable in ALL if where.startswith("docs/"))


RUNNABLE_COMMANDS = [(w, c) for w, c, runnable in ALL if runnable]


@pytest.mark.parametrize(("where", "command"), RUNNABLE_COMMANDS, ids=[w for w, _ in RUNNABLE_COMMANDS])
def test_runnable_commands_exit_0(where, command, tmp_path):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPQ_TRACKING_REPO": str(tmp_path)}
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def _make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


MPQ = [(w, c) for w, c, _ in ALL if words(c) and Path(words(c)[0]).name == "mpq"]
MAKE = [(w, c) for w, c, _ in ALL if words(c) and words(c)[0] == "make"]


def test_the_readme_commands_have_no_placeholders():
    patterns = [(w, c) for w, c, _ in ALL if w.startswith("README.md") and PLACEHOLDER.search(" ".join(words(c)))]
    assert not patterns, f"README.md commands must run as written: {patterns}"


@pytest.mark.parametrize(("where", "command"), MAKE, ids=[w for w, _ in MAKE])
def test_make_commands_name_a_target(where, command):
    targets = [w for w in words(command)[1:] if not w.startswith("-") and "=" not in w]
    assert targets and set(targets) <= _make_targets(), f"{where}: `{command}`: no such Makefile target"


def _compose_and_validate(stage: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from framework.config import validate_config
    from framework.paths import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"stage={stage}"])
    finally:
        GlobalHydra.instance().clear()
    validate_config(cfg)


@pytest.mark.parametrize(("where", "command"), MPQ, ids=[w for w, _ in MPQ])
def test_mpq_commands_compose_and_validate(where, command):
    from framework.stages import STAGES
    from launchers.cli import check_group_choices, check_overrides, split_hydra_args

    argv = words(command)[1:]
    if PLACEHOLDER.search(" ".join(argv)):
        assert not where.startswith("README.md"), f"{where}: `{command}` has a placeholder"
        pytest.skip("a pattern with a placeholder")
    if not argv or argv[0] in ("-h", "--help", "help"):
        return
    stage, rest = argv[0], argv[1:]
    assert stage in STAGES, f"{where}: unknown stage in `{command}`"
    flags, overrides = split_hydra_args(rest)
    problem = check_group_choices(overrides)
    if flags:  # --help, --cfg, --multirun: composed as the command composes them, a sweep at its first values
        problem = problem or check_overrides(stage, overrides)
    assert problem is None, f"{where}: `{command}`: {problem}"
    if not flags:
        _compose_and_validate(stage, [o for o in overrides if not o.startswith("hydra.")])


def test_the_readme_tables_list_every_stage_and_config_group():
    """The README's stage table links a page for every registered stage, and its configuration
    table has a row for every config group of conf/."""
    from framework.paths import CONF_DIR
    from framework.stages import STAGES

    readme = (REPO_ROOT / "README.md").read_text()
    for name in STAGES:
        assert f"| [`{name}`](docs/stages/{name}.md) |" in readme, f"README.md: no row for mpq {name}"
        assert (REPO_ROOT / "docs" / "stages" / f"{name}.md").is_file(), f"docs/stages/{name}.md is missing"
    for group in sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        assert f"\n| `{group}` |" in readme, f"README.md: the configuration table has no row for conf/{group}/"
