"""Packaging: a quiet install that keeps twistd's plugins visible (issue 14 item 10)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def test_every_directory_that_ships_files_is_a_declared_package() -> None:
    """setuptools warns ('Package parsers.data is absent from the packages
    configuration', ~50 lines) for a directory of shipped files that is not a
    declared package: each directory under a declared one is declared."""
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for package in sorted(declared):
        for sub in (ROOT / package.replace(".", "/")).rglob("*"):
            if not sub.is_dir() or sub.name == "__pycache__":
                continue
            if any(f.is_file() and f.suffix != ".pyc" for f in sub.iterdir()):
                name = ".".join(sub.relative_to(ROOT).parts)
                assert name in declared, f"{name} ships files but is not in packages"


def test_editable_installs_need_no_compat_mode() -> None:
    """The checkout's packages sit at its top ('' = '.'), which makes setuptools'
    editable install a plain .pth (as 'compat' did, without its warning)."""
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"": "."}
    assert "editable_mode=compat" not in (ROOT / "Makefile").read_text("utf-8")


@pytest.mark.parametrize("plugin", ["llmobserve", "llmobserve-collector"])
def test_twistd_finds_the_plugins_from_any_directory(plugin: str, tmp_path: Path) -> None:
    """twistd PLUGIN --help works outside the checkout (the installed package's
    twisted/plugins/ is on twistd's plugin path)."""
    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    out = subprocess.run(
        [sys.executable, "-c", twistd, plugin, "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Usage: twistd [options] {plugin} [options]")


def test_the_readme_calls_the_commands_where_make_setup_puts_them() -> None:
    """Issue 14 item 9: make setup does not put .venv/bin on PATH, so every
    llmobserve and twistd command the README gives is .venv/bin/...; the text
    says how to activate the virtualenv instead."""
    import re

    readme = (ROOT / "README.md").read_text("utf-8")
    bare = re.compile(r"(?<![\w/.-])(llmobserve (report|events)\b|twistd (-n\b|llmobserve --help))")
    found = [m.group(0) for m in bare.finditer(readme)]
    assert found == [], found
    assert ". .venv/bin/activate" in readme


def test_make_run_passes_proxy_options() -> None:
    """C{make run ARGS="--provider-host ..."} starts the proxy with those options:
    the README's way to name a local server for a proxy the user starts."""
    out = subprocess.run(
        ["make", "-n", "run", "ARGS=--provider-host 127.0.0.1:18080=openai"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [run] = [line for line in out.stdout.splitlines() if "twistd" in line]
    assert run.split() == [
        ".venv/bin/twistd",
        "-n",
        "llmobserve",
        "--port",
        "9000",
        "--provider-host",
        "127.0.0.1:18080=openai",
    ]
