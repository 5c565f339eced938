"""The C{llmobserve} command run as a user runs it, from real-process tests."""

from __future__ import annotations

import subprocess
import sys

from support.proxy import loopback_env

__all__ = ["llmobserve", "new_key"]


def llmobserve(*args: str) -> subprocess.CompletedProcess[str]:
    """C{llmobserve ARGS} in a process of its own (loopback-only environment)."""
    return subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=loopback_env(),
    )


def new_key(*args: str) -> str:
    """C{llmobserve keys create ARGS}: the key, alone on the last line."""
    done = llmobserve("keys", "create", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]
