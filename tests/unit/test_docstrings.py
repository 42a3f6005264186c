"""Docstrings in framework/ and launchers/ state the contract and the math, not the code's history.

A docstring says what the code computes, its inputs and outputs and the paper it follows. It holds no
date (ISO `2026-12-03`, `Dec 3, 2026`, `3 December`, `this afternoon`), no hash of a commit of this
repository, and no timing of an earlier version (`took 5.0 s`, `0.66 ms against 0.68 ms`,
`20-22 s instead of 16-17 s`, `faster than before`): measurements belong to benchmarks/README.md.
:func:`history_in` is the checker; the last tests hold it to positive and negative examples.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("framework", "launchers")

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_DAY = r"(?:[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)\d\d"
#: one duration, or a range of them: `0.66 ms`, `5.0-5.7 s`, `~1.6 ms`, `20 minutes`
_TIME = (r"~?\d+(?:\.\d+)?(?:\s*(?:-|–|to)\s*\d+(?:\.\d+)?)?\s*"
         r"(?:ns|us|µs|ms|s|secs?|seconds?|mins?|minutes?|h|hrs?|hours?)\b")

DATES = {
    "ISO date": re.compile(r"\b(?:19|20)\d\d[-/](?:0[1-9]|1[0-2])[-/](?:0[1-9]|[12]\d|3[01])\b"),
    "month-name date": re.compile(  # capitalised month names only: "may" the verb is no date
        rf"\b{_MONTH}\.?\s+(?:{_DAY}(?:,?\s+{_YEAR})?|{_YEAR})\b"
        rf"|\b{_DAY}\s+{_MONTH}\b\.?(?:,?\s+{_YEAR}\b)?"),
    "relative date": re.compile(
        r"\b(?:yesterday|today|tonight|this\s+(?:morning|afternoon|evening|week|month)"
        r"|last\s+(?:night|week|month))\b", re.IGNORECASE),
}

TIMING_HISTORY = {
    "two timings compared": re.compile(
        rf"{_TIME}[^.;:\n]{{0,40}}?\s(?:instead\s+of|against|versus|vs\.?|compared\s+(?:with|to)|down\s+from"
        rf"|up\s+from|rather\s+than)\s+(?:about\s+|roughly\s+)?{_TIME}", re.IGNORECASE),
    "a timing that changed": re.compile(
        rf"\b(?:fell|dropped|rose|went|came\s+down|improved|shrank|grew|sped\s+up|slowed)\s+from\s+{_TIME}"
        rf"\s+to\s+{_TIME}", re.IGNORECASE),
    "a past timing": re.compile(
        rf"\b(?:took|used\s+to\s+(?:take|cost)|previously\s+(?:took|cost)|was\s+taking|measured\s*:)\s*"
        rf"(?:about\s+|roughly\s+|around\s+|only\s+)?{_TIME}", re.IGNORECASE),
    "a timing measured here": re.compile(
        rf"{_TIME}[^.;:()\n]{{0,40}}?\b(?:here|on\s+this\s+machine)\b", re.IGNORECASE),
    "a comparison with an earlier version": re.compile(
        r"\b(?:faster|slower|quicker)\s+than\s+(?:before|previously|it\s+was|it\s+used\s+to"
        r"|the\s+(?:old|previous|earlier|former|original)\b)", re.IGNORECASE),
    "a reference to an earlier version": re.compile(
        r"\b(?:since|before|until|as\s+of)\s+(?:commit|v\d+(?:\.\d+)*\b)"
        r"|\b(?:an?|the)\s+(?:earlier|previous|prior)\s+(?:session|commit|revision)\b", re.IGNORECASE),
}

#: a hex word that may abbreviate a commit (git's shortest abbreviation is 7 digits)
HEX = re.compile(r"(?<![\w.])[0-9a-fA-F]{7,40}(?![\w.])")


def history_in(text: str, is_commit: Callable[[str], bool] | None = None) -> list[str]:
    """Every passage of `text` that is a date, a commit of this repository (when `is_commit` is
    given) or a timing of an earlier version, each as `kind: 'passage'`."""
    found = [f"{kind}: {m.group(0)!r}" for kind, pattern in {**DATES, **TIMING_HISTORY}.items()
             for m in pattern.finditer(text)]
    if is_commit is not None:
        found += [f"commit hash: {m.group(0)!r}" for m in HEX.finditer(text) if is_commit(m.group(0).lower())]
    return found


@cache
def _git() -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    inside = subprocess.run([git, "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True)
    return git if inside.returncode == 0 else None


@cache
def is_commit(token: str) -> bool:
    """`token` names a commit of this repository (`git cat-file -e <token>^{commit}`)."""
    git = _git()
    assert git is not None
    return subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{token}^{{commit}}"],
                          capture_output=True).returncode == 0


def _modules() -> list[Path]:
    return sorted(path for root in ROOTS for path in (REPO / root).rglob("*.py"))


def _docstrings(module_only: bool) -> Iterator[tuple[str, str]]:
    """(where, docstring) of every module of framework/ and launchers/, or of their classes and functions."""
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = [tree] if module_only else [node for node in ast.walk(tree) if isinstance(
            node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=False)
            if doc:
                name = "module" if isinstance(node, ast.Module) else f"{node.name} (line {node.lineno})"
                yield f"{path.relative_to(REPO)}: {name}", doc


def _report(module_only: bool, commits: bool) -> list[str]:
    check = is_commit if commits else None
    return [f"{where}: {problem}" for where, doc in _docstrings(module_only) for problem in history_in(doc, check)]


def test_there_are_modules_to_check():
    assert len(_modules()) > 50 and sum(1 for _ in _docstrings(module_only=True)) > 50


@pytest.mark.parametrize("module_only", [True, False], ids=["modules", "classes-and-functions"])
def test_no_docstring_holds_a_date_or_a_timing_of_an_earlier_version(module_only):
    problems = _report(module_only, commits=False)
    assert not problems, "state the contract and the math, not history:\n" + "\n".join(problems)


@pytest.mark.parametrize("module_only", [True, False], ids=["modules", "classes-and-functions"])
def test_no_docstring_names_a_commit(module_only):
    if _git() is None:
        pytest.skip("git or the repository's history is not available")
    problems = [p for p in _report(module_only, commits=True) if p.split(": ", 2)[-1].startswith("commit hash")]
    assert not problems, "state the contract and the math, not history:\n" + "\n".join(problems)


HISTORY = [
    "Measured on 2026-12-03 with 4 threads.",
    "The kernel (timed 2026/12/03) is exact.",
    "As measured on Dec 3, 2026, the loader is exact.",
    "Rewritten on 3 December 2026.",
    "Valid since December 2026.",
    "Found this afternoon on the cluster.",
    "Evaluation took 5.0-5.7 s; now it is quick.",
    "This made evaluation take 5.0-5.7 s instead of 2.5-3.0 s.",
    "The resize runs at 0.66 ms against 0.68 ms for the decode.",
    "A step fell from 265 ms to 210 ms.",
    "first touching fresh memory cost ~1.6 ms per image here",
    "the first op after a kernel is slow (measured: 35-54 us for a 4-element `.to()`)",
    "The search used to take 20 minutes.",
    "The packed path is 2x faster than before.",
    "The order is exact since commit 5ca2add.",
    "This is what an earlier session found.",
]

CURRENT = [
    "A checkpoint is written to `.<name>.tmp-<pid>` and renamed; `sha256` of the tensors is checked.",
    "The default timeout, 30 s, can cut a large checkpoint short on a busy machine.",
    "Importing this module does not import FFCV (3-4 s).",
    "Every 2 s the wait polls; the job may 3 times be requeued.",
    "HAWQ-V2 (Dong et al., NeurIPS 2020) and the MobileNet-V2 of Sandler et al. 2018; ICML 2021.",
    "`OPEN_BACKOFF_S`, 2x, 4x ... seconds apart (a lock held longer than `LOCK_WAIT_S`).",
    "The unsigned 2-bit codes [1, 2, 3] pack to the byte 0b00111001 (0x39).",
    "lr(t) = lr * t / W for t < W; the seed used to draw the subset is recorded.",
    "Run `mpq study study=<name>`: a run resumed in a later session still reports its whole cost.",
    "The loss is measured on the full-precision model; the stride is 2 in March-like layouts.",
    "Uniform 8/8 is ~116 GBitOps for ResNet-18 at 224x224; max 1e-3 and 2.2e-16.",
    "A period of 2-3 s between probes; values between 1 and 10 s are allowed.",
]


@pytest.mark.parametrize("text", HISTORY)
def test_the_checker_finds_history(text):
    assert history_in(text, is_commit=lambda token: token == "5ca2add"), text


@pytest.mark.parametrize("text", CURRENT)
def test_the_checker_passes_the_contract_and_the_math(text):
    assert history_in(text, is_commit=lambda token: token == "5ca2add") == [], text


def test_the_checker_asks_git_about_hex_words():
    if _git() is None:
        pytest.skip("git or the repository's history is not available")
    head = subprocess.run([_git(), "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for token in (head, head[:7], head[:12].upper()):
        assert history_in(f"Exact since {token}, the loader shards.", is_commit), token
    assert history_in("The byte 0b00111001 and the word deadbeef0 and 1234567 samples.", is_commit) == []
