"""Documented default locations, in one place.

Everything llmobserve keeps on disk lives under one home directory:
C{$LLMOBSERVE_HOME}, or C{~/.llmobserve} when that is unset. The proxy's
embedded store, the collector's default store and the C{llmobserve} command
all read the same file, C{events.sqlite3}, there; the proxy's spool of
unacknowledged events is the C{spool} directory beside it.

Importing this module must stay cheap: no Twisted, nothing created on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV_HOME",
    "default_db_path",
    "default_home",
    "default_spool_dir",
    "no_store_message",
]

#: The environment variable that moves the home directory.
ENV_HOME = "LLMOBSERVE_HOME"

_DB_NAME = "events.sqlite3"
_SPOOL_NAME = "spool"


def default_home() -> Path:
    """C{$LLMOBSERVE_HOME} if set and non-empty, else C{~/.llmobserve}."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".llmobserve"


def default_db_path() -> Path:
    """The default event store: C{<home>/events.sqlite3}."""
    return default_home() / _DB_NAME


def default_spool_dir() -> Path:
    """The default spool directory for unacknowledged events: C{<home>/spool}."""
    return default_home() / _SPOOL_NAME


def no_store_message(path: str | os.PathLike[str]) -> str:
    """What a command that only reads says when its store file is not there:
    it never creates one (a mistyped C{--db} would otherwise print an empty
    answer, and leave a new file behind)."""
    return (
        f"no event store at {path} (give --db PATH, or --collector URL, or set"
        f" $LLMOBSERVE_DB or ${ENV_HOME})"
    )
