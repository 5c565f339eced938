"""A bounded, named thread pool for parsing and pricing finished exchanges.

Twisted's C{ThreadPool} queues work in an unbounded deque (RELIABILITY.md,
fact 13), so L{ParsePool} counts what it has handed over itself and refuses
more than C{workers + queue} at once: the caller then records the exchange
without parsing instead of waiting. Results come back on the reactor thread
through C{deferToThreadPool}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from llmobserve.events._waiters import Waiters

__all__ = ["DaemonThreadPool", "ParsePool"]

_R = TypeVar("_R")


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A parser stuck past the drain deadline, or a test that fails before
    # stopping the pipeline, must not keep the process alive.
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class DaemonThreadPool(ThreadPool):
    """A C{ThreadPool} whose threads never keep the process alive."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]  # Thread-compatible factory


class ParsePool:
    """At most C{workers} threads and C{queue} waiting jobs; never blocks.

    @ivar in_flight: jobs handed over whose result has not come back yet.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        workers: int = 2,
        queue: int = 1000,
        name: str = "llmobserve-parse",
    ) -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be >= 1 and queue >= 0")
        self._reactor: IReactorFromThreads = reactor
        self.limit = workers + queue
        self.in_flight = 0
        self._pool = DaemonThreadPool(minthreads=0, maxthreads=workers, name=name)
        self._idle = Waiters(reactor)

    @property
    def full(self) -> bool:
        """Would L{try_submit} refuse a job now?"""
        return self.in_flight >= self.limit

    def start(self) -> None:
        """Start the threads (lazily: they are created as work arrives)."""
        self._pool.start()

    def try_submit(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R] | None:
        """Run C{fn(*args)} in a worker; None (and nothing queued) when full."""
        if self.in_flight >= self.limit or not self._pool.started:
            return None
        self.in_flight += 1
        d = deferToThreadPool(self._reactor, self._pool, fn, *args)
        d.addBoth(self._done)
        return d

    def _done(self, result: _R) -> _R:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle:
            self._idle.fire()
        return result

    def wait_idle(self, timeout: float) -> Deferred[bool]:
        """Fire with True once nothing is in flight, or False after C{timeout}."""
        if self.in_flight == 0:
            return succeed(True)
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Stop the threads; joins only when no job is running (never hangs)."""
        if not self._pool.started:
            return
        if self.in_flight == 0:
            self._pool.stop()
        else:
            # a stuck job: let its daemon thread die with the process
            self._pool.started = False
            self._pool._team.quit()
