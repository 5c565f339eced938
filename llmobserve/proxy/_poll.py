"""A leaner poll step for Twisted's epoll reactor.

C{EPollReactor.doPoll} hands every ready descriptor to its handler through
C{twisted.python.log.callWithLogger}: it asks the selectable for its log
prefix and runs the handler inside a fresh legacy log context (a copy of
the context map, a thread-local lookup, two nested calls). Only legacy
C{twisted.python.log} messages read that context, to put the selectable's
prefix in their C{[system]} column. Per relayed request that is two or
more ready descriptors, and measured on the pinned proxy at c=64 it cost
~10 us of the reactor thread's time per request (six alternating rounds
of C{wrk} on two proxies side by side: 65 vs 76 us on the reactor thread,
115 vs 126 us in all), far more than the ~1 us of a warm micro-benchmark.

L{install_lean_poll} replaces the installed reactor's C{doPoll} (and
C{doIteration}, the same method) with one that calls the reactor's own
C{_doReadOrWrite} directly. C{_doReadOrWrite} already turns an exception
from C{doRead}/C{doWrite} into a lost connection and logs it; what it lets
escape (a C{connectionLost} that raises) is logged here and the loop goes on
with the next descriptor, as C{callWithLogger} does. Legacy log lines
written while handling I/O show C{[-]} as their system instead of the
protocol's prefix; C{twisted.logger} events (all of this project's) are
unchanged.

It reads C{EPollReactor} internals (C{_poller}, C{_selectables},
C{_doReadOrWrite}), once, through C{_compat.epoll_internals};
C{tests/proxy/test_compat.py} is their tripwire. Any other reactor, or an
epoll reactor whose C{doPoll} is already overridden, is left alone.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

from llmobserve.proxy._compat import epoll_internals

__all__ = ["install_lean_poll"]

_log = Logger()


def install_lean_poll(reactor: Any) -> bool:
    """Give C{reactor} the lean poll step; False (and no change) unless it is
    an unmodified C{EPollReactor}. Call it before anything wraps
    C{doIteration} (L{llmobserve.events._turns.ReactorTurns} does)."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll on this platform
        return False
    if (
        not isinstance(reactor, EPollReactor)
        or "doIteration" in vars(reactor)
        or "doPoll" in vars(reactor)
        or type(reactor).doPoll is not EPollReactor.doPoll
        or type(reactor).doIteration is not EPollReactor.doPoll
    ):
        return False
    internals = epoll_internals(reactor)
    if internals is None:
        return False
    poll, selectables, handle = (
        internals.poller.poll,
        internals.selectables,
        internals.do_read_or_write,
    )

    def doPoll(timeout: float | None) -> None:
        """C{EPollReactor.doPoll} without a log context per ready descriptor."""
        try:
            ready = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:  # as Twisted: the loop polls again
                return
            raise
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a handler earlier in this turn
            try:
                handle(selectable, fd, event)
            except Exception:
                _log.failure(
                    "unhandled error while handling I/O on {selectable!r}", selectable=selectable
                )

    epoll: Any = reactor  # its poll step is an untyped method
    epoll.doPoll = epoll.doIteration = doPoll
    return True
