"""A bounded, named thread pool for parsing and pricing finished exchanges.

Twisted's C{ThreadPool} queues work in an unbounded deque (RELIABILITY.md,
fact 13), so L{ParsePool} counts what it has handed over itself and refuses
more than C{workers + queue} items at once: the caller then records the
exchange without parsing instead of waiting. Items go to the threads through
C{deferToThreadPool} as jobs: what arrives within C{gather} seconds goes as
one job to a free thread (or at once when C{batch} are waiting): one thread
hand-off and one reactor wake-up per batch instead of per exchange.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from llmobserve.events._waiters import Waiters

__all__ = ["DaemonThreadPool", "ParsePool"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_log = Logger()


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A parser stuck past the drain deadline, or a test that fails before
    # stopping the pipeline, must not keep the process alive.
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class DaemonThreadPool(ThreadPool):
    """A C{ThreadPool} whose threads never keep the process alive."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]  # Thread-compatible factory


class ParsePool(Generic[_T, _R]):
    """At most C{workers} threads and C{workers + queue} items; never blocks.

    @param work: runs in a thread with a batch of items, returns their results.
    @param done: called on the reactor with each batch's results.
    @param failed: called on the reactor with a batch whose C{work} raised.
    @ivar in_flight: items accepted whose batch has not come back yet.
    """

    def __init__(
        self,
        reactor: Any,
        work: Callable[[list[_T]], list[_R]],
        done: Callable[[list[_R]], None],
        failed: Callable[[list[_T], Failure], None],
        *,
        workers: int = 2,
        queue: int = 1000,
        batch: int = 64,
        gather: float = 0.0,
        name: str = "llmobserve-parse",
    ) -> None:
        if workers < 1 or queue < 0 or batch < 1:
            raise ValueError("workers and batch must be >= 1, queue >= 0")
        self._reactor: IReactorFromThreads = reactor
        self._work, self._done_cb, self._failed_cb = work, done, failed
        self.limit = workers + queue
        self.batch = batch
        self.in_flight = 0
        self.workers = workers
        self._jobs = 0  # batches handed to the threads and not back yet
        self._pending: list[_T] = []
        self._gather = gather
        self._gather_call: Any = None
        self._pool = DaemonThreadPool(minthreads=0, maxthreads=workers, name=name)
        self._idle = Waiters(reactor)

    @property
    def full(self) -> bool:
        """Would L{try_submit} refuse an item now?"""
        return self.in_flight >= self.limit

    def start(self) -> None:
        """Start the threads (lazily: they are created as work arrives)."""
        self._pool.start()

    def try_submit(self, item: _T) -> bool:
        """Queue one item; False (nothing queued) when full.

        Items gather for C{gather} seconds and go as one job to a free
        thread, or at once when C{batch} of them are waiting: batching grows
        with load, and costs the client no latency (the call is answered).
        """
        if self.in_flight >= self.limit or not self._pool.started:
            return False
        self.in_flight += 1
        self._pending.append(item)
        if len(self._pending) >= self.batch:
            self.flush()
        elif self._jobs < self.workers:
            self._flush_soon()
        return True

    def _flush_soon(self) -> None:
        """Hand the gathered items to a free thread once C{gather} has passed.

        Light load: a few milliseconds' worth go as one job, one thread
        wake-up and one reactor wake-up for all of them, also when a job has
        just come back (handing over at once what arrived meanwhile made
        jobs of 1.8 exchanges on average at c=1, each with its own thread
        hand-offs, reactor wake-ups and store write)."""
        if self._gather <= 0:
            self.flush()
        elif self._gather_call is None:
            self._gather_call = self._reactor.callLater(  # type: ignore[attr-defined]  # typed IReactorFromThreads; real reactors have callLater
                self._gather, self.flush
            )

    def flush(self) -> None:
        """Hand the items gathered so far to a thread now."""
        call, self._gather_call = self._gather_call, None
        if call is not None and call.active():
            call.cancel()
        items, self._pending = self._pending, []
        if not items:
            return
        self._jobs += 1
        d = deferToThreadPool(self._reactor, self._pool, self._work, items)
        d.addCallbacks(self._done_cb, self._failed_cb, errbackArgs=(items,))
        d.addBoth(self._finished, len(items))

    def _finished(self, result: object, count: int) -> None:
        self._jobs -= 1
        self.in_flight -= count
        if isinstance(result, Failure):
            _log.failure("parse batch callback failed", result)
        if self._pending and self._jobs < self.workers:
            self._flush_soon()
        if self.in_flight == 0 and self._idle:
            self._idle.fire()

    def wait_idle(self, timeout: float) -> Deferred[bool]:
        """Fire with True once nothing is in flight, or False after C{timeout}."""
        self.flush()
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
