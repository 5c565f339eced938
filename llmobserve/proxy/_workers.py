"""C{--workers N}: more proxy processes sharing one port (SO_REUSEPORT, Linux).

The process that twistd starts listens like any other and spawns N-1
copies of itself with the same options, each listening on the same
address with C{SO_REUSEPORT}, so the kernel spreads new connections over
them. Each worker has its own event spool (the pipeline picks a free
spool directory) and writes the same store. On stop the first process
sends SIGTERM to the others and waits for their drain. A worker whose
parent disappears stops by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmobserve.endpoints import LISTEN_BACKLOG, endpoint_parts

__all__ = ["WorkerProcesses", "child_arguments", "listen_reuseport", "tcp_address"]

_log = Logger()

#: twistd itself: C{python -m twisted} is the newer C{twist} runner, which has no -n.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def tcp_address(description: str) -> tuple[str, int] | None:
    """(interface, port) of a plain C{tcp:PORT[:interface=IP]} endpoint string, else None."""
    parts = endpoint_parts(description)
    if parts[0] != "tcp" or len(parts) < 2:
        return None
    port = parts[1][5:] if parts[1].startswith("port=") else parts[1]
    if not port.isdigit():
        return None
    interface = "0.0.0.0"
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key == "interface":
            interface = value.replace("\\", "")
        elif key != "backlog":
            return None
    return interface, int(port)


def listen_reuseport(reactor: Any, interface: str, port: int, factory: Any) -> IListeningPort:
    """Listen on (interface, port) with SO_REUSEPORT so sibling workers can too."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        listening: IListeningPort = reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # adoptStreamPort keeps its own duplicate of the descriptor
    return listening


def child_arguments(argv: Sequence[str], port: str, parent_pid: int) -> list[str]:
    """The twistd command line of a sibling worker, from this process's own."""
    args = list(argv[1:])
    try:
        at = args.index("llmobserve")
    except ValueError:
        raise RuntimeError("cannot find the llmobserve subcommand in the command line") from None
    before, after = args[: at + 1], args[at + 1 :]
    before = [a for a in before if not a.startswith(("--pidfile", "--logfile", "-l"))]
    kept: list[str] = []
    skip = False
    for arg in after:
        if skip:
            skip = False
            continue
        if arg in ("--port", "-p", "--workers", "--worker-of"):
            skip = True
            continue
        if arg.startswith(("--port=", "--workers=", "--worker-of=")):
            continue
        kept.append(arg)
    head = [a for a in before if a not in ("-n", "--nodaemon")]
    return ["-n", "--pidfile=", *head, *kept, "--port", port, "--worker-of", str(parent_pid)]


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        if not self.ended.called:
            self.ended.callback(None)


class WorkerProcesses:
    """Spawns and stops the sibling workers of this proxy process."""

    def __init__(self, reactor: Any, count: int, argv: Sequence[str]) -> None:
        self._reactor = reactor
        self._count = count
        self._argv = list(argv)
        self._children: list[tuple[Any, _Child]] = []

    def spawn(self, interface: str, port: int) -> None:
        """Start the N-1 siblings on the address this process now listens on."""
        escaped = interface.replace(":", "\\:")  # endpoint strings escape colons
        description = f"tcp:{port}:interface={escaped}"
        args = child_arguments(self._argv, description, os.getpid())
        for _ in range(self._count - 1):
            child = _Child()
            process = self._reactor.spawnProcess(
                child,
                sys.executable,
                [sys.executable, "-c", _TWISTD, *args],
                env=dict(os.environ),
                childFDs={0: "w", 1: 1, 2: 2},
            )
            self._children.append((process, child))
        _log.info(
            "started {n} more llmobserve workers on port {port}", n=self._count - 1, port=port
        )

    def terminate(self) -> None:
        """Ask every sibling to drain and exit (SIGTERM)."""
        for process, child in self._children:
            if not child.ended.called:
                try:
                    process.signalProcess("TERM")
                except Exception:
                    pass

    def ended(self) -> Deferred[None]:
        """Fires once every sibling has exited."""
        waits = [child.ended for _, child in self._children if not child.ended.called]
        if not waits:
            return succeed(None)
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)


class ParentWatch(Service):
    """In a worker: stop when the process that spawned it is gone."""

    def __init__(self, reactor: Any, parent_pid: int) -> None:
        self._reactor = reactor
        self._parent = parent_pid
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(1.0, now=False)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        return succeed(None)

    def _check(self) -> None:
        if os.getppid() != self._parent:
            _log.info("the first llmobserve process is gone: stopping this worker")
            os.kill(os.getpid(), signal.SIGTERM)
