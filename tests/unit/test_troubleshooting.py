"""Every error a user can meet is listed on docs/troubleshooting.md, with what to do about it.

A mistake in the input ends a run with one `MPQError` message, and the user relies on finding that
message on the troubleshooting page next to its fix. Every `raise MPQError(<message>)` in
`framework/` and `launchers/` whose message is a string or an f-string is found here with `ast`;
the longest constant piece of the message (whitespace-normalised, at least 12 characters) must
appear, by its first 40 characters, in the page's text. A message built from a variable or a call
is skipped. The test lists every missing message at once, as `path:line: fragment`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from framework.paths import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "troubleshooting.md"
SOURCE_DIRS = ("framework", "launchers")
MIN_FRAGMENT = 12
PREFIX = 40


def normalise(text: str) -> str:
    return " ".join(text.split())


def literal_pieces(message: ast.expr) -> list[str] | None:
    """The constant parts of a str or f-string message; None for a message built otherwise."""
    if isinstance(message, ast.Constant) and isinstance(message.value, str):
        return [message.value]
    if isinstance(message, ast.JoinedStr):
        return [part.value for part in message.values if isinstance(part, ast.Constant)]
    return None


def is_mpq_error(call: ast.expr | None) -> bool:
    if not isinstance(call, ast.Call) or not call.args:
        return False
    func = call.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return name == "MPQError"


def error_fragments() -> Iterator[tuple[Path, int, str]]:
    """(file, line, longest literal piece) of every `raise MPQError(<str or f-string>)`."""
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Raise) or not is_mpq_error(node.exc):
                    continue
                pieces = literal_pieces(node.exc.args[0])
                if pieces is None:
                    continue
                fragment = max((normalise(piece) for piece in pieces), key=len, default="")
                if len(fragment) >= MIN_FRAGMENT:
                    yield path, node.lineno, fragment


def test_the_scan_finds_errors() -> None:
    assert sum(1 for _ in error_fragments()) > 50


def test_every_error_message_is_on_the_troubleshooting_page() -> None:
    page = normalise(PAGE.read_text(encoding="utf-8"))
    missing = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {fragment}"
        for path, line, fragment in error_fragments()
        if fragment[:PREFIX] not in page
    ]
    assert not missing, (
        f"{len(missing)} error message(s) are not on docs/troubleshooting.md; add a row with the "
        "message and what to do:\n" + "\n".join(missing)
    )
