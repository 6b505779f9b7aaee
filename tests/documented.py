"""The command lines the README and docs show, and the test that runs each as written.

A command line is what a reader would paste into a shell: in a fenced ``sh``/``bash``
block every line that is not a comment, in a ``console`` block every line after ``$ ``.
Lines ending in ``\\`` continue, and so does a line that leaves a quote open (a
multi-line ``curl -d '...'``); a trailing ``# comment`` is not part of the command.

A test runs a documented command through ``documented(TEXT)``, with TEXT the command as
the docs show it (whitespace collapsed), so :func:`commands_run_by_tests` finds which test
runs which command by reading the test modules. tests/unit/test_documented_commands.py
checks both ways: every command the docs show is run by a test (or by CI itself:
``RUN_BY_CI``), and every command a test runs is still in the docs. So a new example in
the docs fails the suite until a test runs it.

Pure: reads files, starts nothing.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "docs/*.md")
SHELL_LANGS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\s*$")

# Placeholders the docs use for what differs per reader; a test substitutes its own value.
PLACEHOLDERS = {"BROKER_HOST": "127.0.0.1"}

# Run by CI itself (.ci/run), not by a test inside the suite it runs.
RUN_BY_CI = {"scripts/test.sh"}
TEST_GLOBS = ("tests/integration/test_*.py", "tests/conformance/test_*.py")


@dataclass(frozen=True)
class DocCommand:
    """One command line shown in a document: where, and its text with continuations joined."""

    path: str  # relative to the repository root
    line: int  # where it starts (1-based)
    text: str  # whitespace collapsed, continuations and trailing comment removed


def normalize(text: str) -> str:
    """A command's text with runs of whitespace collapsed (outside and inside quotes alike)."""
    return " ".join(text.split())


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole shell command: no open quote, no trailing backslash."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def _strip_comment(text: str) -> str:
    """``text`` without a trailing ``# comment`` outside quotes."""
    quote: str | None = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text


def commands_in(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """The command lines of one Markdown file's shell blocks."""
    out: list[DocCommand] = []
    lang: str | None = None
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(raw.strip())
        if fence:
            lang = None if lang is not None else fence.group(1)
            pending = []
            continue
        if lang not in SHELL_LANGS:
            continue
        line = raw.strip()
        if not pending:
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            start = number
        pending.append(line)
        joined = "\n".join(pending)
        if _complete(joined):
            text = normalize(_strip_comment(joined.replace("\\\n", " ")))
            if text:
                out.append(DocCommand(path.relative_to(root).as_posix(), start, text))
            pending = []
    return out


def documented_commands(root: Path = ROOT) -> list[DocCommand]:
    """Every command line of the README and the docs, in file order."""
    files = sorted({p for pattern in DOC_GLOBS for p in root.glob(pattern)})
    return [c for path in files for c in commands_in(path, root)]


def as_run(text: str, **values: str) -> str:
    """The command as a test runs it: each placeholder replaced by the test's own value."""
    for name, value in {**PLACEHOLDERS, **values}.items():
        text = re.sub(rf"\b{re.escape(name)}\b", value, text)
    return text


def commands_run_by_tests(root: Path = ROOT) -> dict[str, str]:
    """Each command a test module passes to ``documented("...")``, and ``path::test`` of the first test that does."""
    found: dict[str, str] = {}
    for path in sorted({p for pattern in TEST_GLOBS for p in root.glob(pattern)}):
        tree = ast.parse(path.read_text(), str(path))
        for fn in (n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "documented"
                        and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    found.setdefault(normalize(node.args[0].value), f"{path.relative_to(root).as_posix()}::{fn.name}")
    return found
