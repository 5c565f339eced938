"""Write-through and coalescing of the proxy's socket writes.

Twisted queues every C{transport.write} until the reactor's next turn
(register for writability, poll, C{send}, unregister): per relayed request
that is two extra loop turns and four C{epoll_ctl} calls on the hot path.
Here, writes made while handling one read are gathered (a request head and
its body; a response head, body and terminator) and, at the end of that
read, sent at once with one C{send} when nothing is already queued, the
rest left to Twisted as usual.

L{write_now} reads C{tcp.Connection} internals (C{socket}, C{dataBuffer},
C{offset}, C{_tempDataLen}), so it lives in C{_compat} with the project's
other private Twisted names; C{tests/proxy/test_compat.py} is their
tripwire. Any other transport (TLS, test transports) takes the normal path.
"""

from __future__ import annotations

from typing import Protocol

from llmobserve.proxy._compat import write_now

__all__ = ["Flushable", "WriteCoalescer", "write_now"]


class Flushable(Protocol):
    queued: bool

    def flush(self) -> None: ...


class WriteCoalescer:
    """Holds writes while one read is handled; flushes them when it ends."""

    __slots__ = ("_depth", "_pending")

    def __init__(self) -> None:
        self._depth = 0
        self._pending: list[Flushable] = []

    def hold(self) -> None:
        self._depth += 1

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pending:
            pending, self._pending = self._pending, []
            for target in pending:
                target.queued = False
                target.flush()

    def wrote(self, target: Flushable) -> None:
        """C{target} has output: flush it now, or when the current read ends."""
        if self._depth == 0:
            target.flush()
        elif not target.queued:
            target.queued = True
            self._pending.append(target)
