"""Capping glibc's malloc arenas: done once on glibc, skipped where it cannot apply."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from llmobserve.proxy import _malloc
from llmobserve.proxy._malloc import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_cap_in_a_fresh_process() -> None:
    code = "from llmobserve.proxy._malloc import limit_malloc_arenas as f; print(f())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.stdout.strip() == "True", out.stderr


def test_an_explicit_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_malloc_arenas() is False


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)

    def no_libc(*_args: object, **_kw: object) -> ctypes.CDLL:
        raise OSError("no such library")

    monkeypatch.setattr(_malloc.ctypes, "CDLL", no_libc)
    assert limit_malloc_arenas() is False
