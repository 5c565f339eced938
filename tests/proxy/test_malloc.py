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


# malloc's own settings for the trim test, fixed so that the heap's layout
# before the test cannot decide what the trim finds: one arena (every thread
# allocates from the main heap), a fixed mmap threshold (a large free earlier
# in the process cannot move it, so 64 KiB blocks always come from the heap),
# no top padding, and a trim threshold so high that free() itself never hands
# memory back. Without the last one, free() gives the blocks back on its own
# whenever they end up next to the heap's top: the small pins are served from
# any hole left by start-up (its size varies with hash randomisation and the
# environment), the big blocks then sit side by side, coalesce with the top
# when freed, and the trim finds nothing left (120 KiB in one CI run of six;
# 124 KiB here when 2,048 small free chunks are left before the loop).
_FIXED_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    "MALLOC_TOP_PAD_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}

_TRIM_PROBE = """\
import ctypes
from llmobserve.proxy._malloc import release_free_memory
def rss():
    line = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
    return int(line.split()[1])
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
HOLES = {holes}  # small free chunks left by "start-up", as a long import can leave them
small, kept = [None] * HOLES, [None] * HOLES
for i in range(HOLES):
    small[i] = libc.malloc(16)
    kept[i] = libc.malloc(16)
for s in small: libc.free(s)
blocks, pins = [None] * 1024, [None] * 1024  # sized up front: no list growth in between
for i in range(1024):  # a small block after each big one where the heap allows
    blocks[i] = libc.malloc(64 * 1024)
    pins[i] = libc.malloc(16)
for b in blocks: ctypes.memset(b, 1, 64 * 1024)
for b in blocks: libc.free(b)
before = rss()
print(release_free_memory(), before - rss())
"""


def _trim_probe_env() -> dict[str, str]:
    """A bare environment (no inherited C{MALLOC_*}, C{GLIBC_TUNABLES} or
    C{LD_PRELOAD}) with malloc's settings fixed."""
    return {"PATH": "/usr/bin:/bin", **_FIXED_MALLOC_ENV}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("holes", [0, 2048], ids=["clean-heap", "small-holes-left"])
def test_freed_heap_pages_go_back_to_the_kernel(holes: int) -> None:
    """64 MiB allocated in 64 KiB blocks from the main heap by one thread of
    a fresh process, then freed: the freed pages stay resident until the
    trim, which takes at least 32 MiB off. malloc's settings are fixed (see
    C{_FIXED_MALLOC_ENV}) so that only the trim can give the memory back,
    whatever the heap looked like before: with small holes left before the
    loop (the pins land in them, the big blocks coalesce with the top) the
    unfixed probe measured 124 KiB."""
    out = subprocess.run(
        [sys.executable, "-c", _TRIM_PROBE.format(holes=holes)],
        capture_output=True,
        text=True,
        env=_trim_probe_env(),
        timeout=60,
    )
    done, released_kib = out.stdout.split()
    assert done == "True", out.stderr
    assert int(released_kib) >= 32 * 1024, out.stdout
