"""The documentation site builds with `mkdocs build --strict`, and strict mode fails where it must.

`make docs` builds `mkdocs.yml` (pages in docs/, the API reference rendered from the docstrings by
mkdocstrings) with `--strict`, so any warning fails the build. Here: the real site builds into a
temporary folder; a copy of the docs with one link to a page that does not exist fails; and a page
that renders a function that does not exist (`::: framework.errors.no_such_function`) fails. The
copies use the project's own configuration (theme, extensions, plugins, validation), read from
mkdocs.yml, with only the folders and the pages changed. Last, every committed study report
(docs/study/<name>/) has its findings page (docs/studies/<name>.md) quoting its numbers, both in the nav.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from framework.paths import REPO_ROOT

CONFIG = REPO_ROOT / "mkdocs.yml"


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `config` into `site`, from the repository root (snippets are
    included relative to it), without network; the completed process with its output."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


def copy_config(tmp_path: Path, docs: Path, nav: list | None = None) -> Path:
    """mkdocs.yml with its docs folder replaced by `docs` (and its nav by `nav`), written into
    `tmp_path`; the API reference still reads the repository's packages."""
    config = yaml.safe_load(CONFIG.read_text())
    config["docs_dir"] = str(docs)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(REPO_ROOT)]
    if nav is not None:
        config["nav"] = nav
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    proc = build(CONFIG, site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file() and (site / "api" / "config" / "index.html").is_file()
    rendered = (site / "api" / "config" / "index.html").read_text()
    assert "framework.config.search.SearchConfig" in rendered  # mkdocstrings rendered the docstrings
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # nothing fetched from Google


def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO_ROOT / "docs", docs)
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    proc = build(copy_config(tmp_path, docs), tmp_path / "site")
    assert proc.returncode != 0, "a link to a missing page passed the strict build"
    assert "no-such-page.md" in proc.stdout + proc.stderr


def test_a_missing_function_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# API\n\n::: framework.errors.MPQError\n\n::: framework.errors.no_such_function\n")
    proc = build(copy_config(tmp_path, docs, nav=["index.md"]), tmp_path / "site")
    assert proc.returncode != 0, "a reference to a missing function passed the strict build"
    assert "framework.errors.no_such_function" in proc.stdout + proc.stderr


def test_every_committed_study_has_its_pages():
    """Each report in docs/study/<name>/ has a findings page, docs/studies/<name>.md, that quotes its
    rows' top-1 as study.json has them, and both pages are in the site's navigation."""
    nav = CONFIG.read_text()
    reports = sorted((REPO_ROOT / "docs" / "study").glob("*/study.json"))
    assert reports
    for path in reports:
        name = path.parent.name
        findings = REPO_ROOT / "docs" / "studies" / f"{name}.md"
        assert findings.is_file(), f"docs/study/{name} has no findings page docs/studies/{name}.md"
        text = findings.read_text()
        for row in json.loads(path.read_text())["rows"]:
            assert f"{100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}" in text, (name, row["name"])
        assert f"studies/{name}.md" in nav and f"study/{name}/study.md" in nav, f"{name} is missing from mkdocs.yml's nav"
