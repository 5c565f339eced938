"""Typing is part of the test suite: C{make test} fails when it breaks.

mypy --strict runs over what pyproject.toml's C{[tool.mypy]} names, which is
all of the project's Python: llmobserve, parsers, tests, bench and the twistd
plugin (issue 12). Cold, that takes about half a minute on this two-core
machine, so the test is marked slow (it still runs in C{make test}).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What mypy must check: every place the project keeps Python.
CHECKED = {"llmobserve", "parsers", "tests", "bench", "twisted/plugins/llmobserve_plugin.py"}

#: An ignore with its error codes, then a comment saying why, on the same line.
_IGNORE = re.compile(r"#\s*type:\s*ignore")
_EXPLAINED = re.compile(r"#\s*type:\s*ignore\[[a-z0-9-]+(,\s*[a-z0-9-]+)*\]  # \S")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_strict_passes_on_all_of_the_projects_python() -> None:
    """mypy with no arguments (pyproject.toml's configuration alone) checks
    llmobserve, parsers, tests, bench and the plugin, strict, and finds no
    error."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert CHECKED <= set(config["files"])
    # In a process of its own: mypy raises the interpreter's recursion limit
    # for good, which changed what later tests in this one saw (a 5,000-deep
    # JSON array no longer hit RecursionError).
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_type_ignore_names_its_codes_and_says_why() -> None:
    """Each C{# type: ignore} names the error codes it silences and gives its
    reason after them on the same line (unused ones mypy reports itself:
    warn_unused_ignores is on under strict)."""
    unexplained = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for top in [*CHECKED, "typings"]
        for path in sorted([ROOT / top] if top.endswith(".py") else [*(ROOT / top).rglob("*.py*")])
        if path.suffix in (".py", ".pyi") and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _IGNORE.search(line) and not _EXPLAINED.search(line)
    ]
    assert not unexplained, "\n".join(unexplained)
