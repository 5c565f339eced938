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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["limit_malloc_arenas"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at C{arenas}; False (nothing done) off
    glibc, when C{MALLOC_ARENA_MAX} is set, or if C{mallopt} refuses.
    Call it before the process starts its threads."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
