"""Capping glibc's malloc arenas: done once on glibc, skipped where it cannot apply."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from llmobserve.proxy._malloc import limit_malloc_arenas, release_free_memory


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

    monkeypatch.setattr("llmobserve.proxy._malloc.ctypes.CDLL", no_libc)
    assert limit_malloc_arenas() is False
    assert release_free_memory() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_pages_go_back_to_the_kernel() -> None:
    """64 MiB allocated in 64 KiB blocks (below the mmap threshold, so from
    the heap), each followed by a small block that stays, then freed: the
    holes stay resident until the trim, which takes at least 32 MiB off."""
    code = (
        "import ctypes\n"
        "from llmobserve.proxy._malloc import release_free_memory\n"
        "def rss():\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]\n"
        "    return int(line.split()[1])\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = (ctypes.c_void_p,)\n"
        "blocks, pins = [], []\n"
        "for _ in range(1024):  # a small block after each big one: free() cannot\n"
        "    blocks.append(libc.malloc(64 * 1024))  # shrink the heap, only a trim can\n"
        "    pins.append(libc.malloc(16))\n"
        "for b in blocks: ctypes.memset(b, 1, 64 * 1024)\n"
        "for b in blocks: libc.free(b)\n"
        "before = rss()\n"
        "print(release_free_memory(), before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    done, released_kib = out.stdout.split()
    assert done == "True", out.stderr
    assert int(released_kib) >= 32 * 1024, out.stdout
