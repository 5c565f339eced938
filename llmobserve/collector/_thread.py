"""One dedicated thread that owns one L{EventStore}.

SQLite connections belong to the thread that uses them, and the collector
must never run SQLite on the reactor thread nor share the reactor's default
thread pool (a slow report must not delay a commit, and the other way round).
L{StoreThread} is a plain thread with a queue: jobs are callables given the
store; results come back as Deferreds fired on the reactor thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from ._store import Store

__all__ = ["StoreThread"]

T = TypeVar("T")

_Job = tuple[Callable[[Store], Any], Deferred[Any]]


class StoreThread(Service):
    """A service running store jobs one after another in its own thread.

    @param reactor: where results are delivered.
    @param open_store: opens the store; called in the thread, once.
    @param name: the thread's name (shows in debuggers and C{py-spy}).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        open_store: Callable[[], Store],
        name: str,
    ) -> None:
        self._reactor = reactor
        self._open_store = open_store
        self._thread_name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stopService(self) -> Deferred[None]:
        """Finish every queued job, close the store, end the thread."""
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        stopped: Deferred[None] = Deferred()
        if self._thread is None:
            stopped.callback(None)
            return stopped
        self._stopped = stopped
        self._queue.put(None)
        return stopped

    def submit(self, job: Callable[[Store], T]) -> Deferred[T]:
        """Run C{job(store)} in the thread; the Deferred fires with its result."""
        d: Deferred[T] = Deferred()
        self._queue.put((job, d))
        return d

    def _run(self) -> None:
        store: Store | None = None
        open_error: BaseException | None = None
        try:
            store = self._open_store()
        except BaseException as e:
            open_error = e
        deliver = self._reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is None:
                break
            job, d = item
            if store is None:
                assert open_error is not None
                deliver(d.errback, open_error)
                continue
            try:
                result = job(store)
            except BaseException as e:
                deliver(d.errback, e)
            else:
                deliver(d.callback, result)
        if store is not None:
            store.close()
        if self._stopped is not None:
            deliver(self._stopped.callback, None)
