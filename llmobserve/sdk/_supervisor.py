"""The process that owns an auto-started proxy: C{python -m llmobserve.sdk._supervisor}.

It runs C{twistd -n llmobserve} as its child, in a session of its own (a
Ctrl-C in the terminal of the application that started it does not reach
the proxy other processes share), and stops it (SIGTERM: the proxy drains
and flushes its events) once no lease belongs to a live process for the
linger time, or when the supervisor itself gets SIGTERM/SIGINT. On Linux
the proxy also gets SIGTERM if the supervisor dies (C{PR_SET_PDEATHSIG}).

This is a separate program, not the SDK: the signal handlers here never
touch the application's process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from llmobserve.sdk._leases import ProxyHome

__all__ = ["main"]

POLL = 0.25
DRAIN_SECONDS = 15.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: twistd itself (C{python -m twisted} runs the newer C{twist}, which has no C{-n}).
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def proxy_command(port: int, proxy_args: list[str]) -> list[str]:
    """The command line of the proxy this supervisor runs: C{twistd -n llmobserve}."""
    return [
        sys.executable,
        "-c",
        _TWISTD,
        "--pidfile=",
        "-n",
        "llmobserve",
        "--port",
        str(port),
        *proxy_args,
    ]


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DRAIN_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run(port: int, home: Path, linger: float, proxy_args: list[str]) -> int:
    """Run the proxy until its leases are gone; the exit code."""
    state = ProxyHome(port, home)
    state.prepare()
    stop_requested = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    state.supervisor_pid.write_text(str(os.getpid()))
    proc = subprocess.Popen(
        proxy_command(port, proxy_args),
        stdin=subprocess.DEVNULL,
        cwd=str(state.root),
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    state.proxy_pid.write_text(str(proc.pid))
    idle_since: float | None = None
    try:
        while not stop_requested:
            if proc.poll() is not None:
                print(f"llmobserve supervisor: proxy exited with {proc.returncode}", flush=True)
                return proc.returncode or 1
            if state.live_leases():
                idle_since = None
            else:
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= linger:
                    with state.locked():
                        if not state.live_leases():
                            print(
                                "llmobserve supervisor: no process uses the proxy; stopping",
                                flush=True,
                            )
                            code = _stop(proc)
                            _clear(state)
                            return code
                    idle_since = None
            time.sleep(POLL)
        return _stop(proc)
    finally:
        _stop(proc)
        _clear(state)


def _clear(state: ProxyHome) -> None:
    """Remove this supervisor's files (not those of a successor already started)."""
    if state.read_pid(state.supervisor_pid) not in (None, os.getpid()):
        return
    for path in (state.supervisor_pid, state.proxy_pid, state.config_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    """Entry point: C{--port N --home DIR --linger S -- PROXY_ARGS...}."""
    parser = argparse.ArgumentParser(prog="python -m llmobserve.sdk._supervisor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--linger", type=float, default=30.0)
    parser.add_argument("--detach", action="store_true", help="fork away from the caller first")
    parser.add_argument("proxy_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    extra = args.proxy_args[1:] if args.proxy_args[:1] == ["--"] else args.proxy_args
    if args.detach and os.fork() > 0:
        os._exit(0)  # the caller reaps this at once; the child is adopted by init
    return run(args.port, args.home, args.linger, extra)


if __name__ == "__main__":
    sys.exit(main())
