"""Ending a C{twistd} process with an exit status that says it failed.

A proxy or collector that cannot listen serves nothing: it must neither keep
running nor exit 0. twistd offers no exit status: once the reactor stops it
returns and the interpreter exits 0. L{stop_with_status} stops the reactor
as soon as it runs (the services stop in order, the spool is closed, twistd
removes its pid file and closes its log), and sets the status from an
C{atexit} hook, the one place left after twistd is done.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any

from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.python.failure import Failure

__all__ = ["cannot_listen_text", "stop_with_status"]

_status: int | None = None


def cannot_listen_text(failure: Failure) -> str:
    """Why a listen failed, in one line: C{127.0.0.1:9000: address already in use}."""
    error = failure.value
    if isinstance(error, CannotListenError):
        cause = error.socketError
        why = getattr(cause, "strerror", None) or str(cause)
        return f"{error.interface or '*'}:{error.port}: {why.lower()}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return f"{type(error).__name__}: {error}"


def stop_with_status(reactor: Any, status: int = 1) -> None:
    """Stop C{reactor} (now, or as soon as it runs), then exit with C{status}."""
    global _status
    if _status is None:
        atexit.register(_exit_with_status)
    _status = status
    if reactor.running:
        _stop(reactor)
    else:
        reactor.callWhenRunning(_stop, reactor)


def _stop(reactor: Any) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _exit_with_status() -> None:
    if _status is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_status)
