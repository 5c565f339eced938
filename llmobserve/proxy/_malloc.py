"""Fewer glibc malloc arenas for the proxy process.

glibc gives threads their own malloc arenas (up to eight per core) so that
they do not contend for one lock; each arena keeps the memory its thread
freed for reuse by that thread. The proxy's event threads (parse, spool,
store) allocate bodies and rows in bursts, and their arenas' leftovers add
to the process's resident size. Two arenas instead: the peak RSS of
C{bench.overhead} (c=64 and 64 streams) went from 79.4-79.5 to 78.3-78.4 MiB
and the idle RSS from 72.0 to 70.9, with the same CPU per request (two
invocations each, interleaved). Pure-Python objects are unaffected
(C{pymalloc} has its own arenas).

The same as starting the process with C{MALLOC_ARENA_MAX=2}, which still
wins when set: an explicit setting is left alone.

L{release_free_memory} hands the heap's free pages back to the kernel
(C{malloc_trim}) once start-up is over (loading the price data and warming
the parsers leave freed holes in the heap): the idle RSS of a fresh
C{twistd llmobserve} went from 74.1 to 73.2 MiB (two starts each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["limit_malloc_arenas", "release_free_memory"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel (glibc's C{malloc_trim});
    False where there is no such call. Takes about a millisecond: for
    start-up's end, not for the hot path."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at C{arenas}; False (nothing done) off
    glibc, when C{MALLOC_ARENA_MAX} is set, or if C{mallopt} refuses.
    Call it before the process starts its threads."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not Linux, or musl and other C libraries without mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
