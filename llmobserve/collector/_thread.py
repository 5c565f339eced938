"""One dedicated thread that owns one L{Store}.

SQLite connections belong to the thread that uses them, and the collector
must never run SQLite on the reactor thread nor share the reactor's default
thread pool (a slow report must not delay a commit, and the other way round).
L{StoreThread} is a plain thread with a queue: jobs are callables given the
store; results come back as Deferreds fired on the reactor thread.

A thread given the store's file to C{watch} (an embedded proxy's report
reader) notices when that file is removed or replaced under it, as the
proxy's writer does, and opens the file found at the path instead of
reading the unlinked one until restart.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from ._store import Store

__all__ = ["StoreThread", "file_identity"]

T = TypeVar("T")

_Job = tuple[Callable[[Store], Any], Deferred[Any]]


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at C{path}; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class StoreThread(Service):
    """A service running store jobs one after another in its own thread.

    @param reactor: where results are delivered.
    @param open_store: opens the store; called in the thread, once.
    @param name: the thread's name (shows in debuggers and C{py-spy}).
    @param watch: the store's file, to be reopened when it changes: before
        each job the thread compares the file's identity (device, inode)
        with the one it opened; when the file was removed or replaced the
        store is closed and C{open_store} called again (a removed file is
        then created anew, empty, as a first open would). A failed open is
        retried at the next job. None: the store is opened once.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        open_store: Callable[[], Store],
        name: str,
        *,
        watch: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._open_store = open_store
        self._thread_name = name
        self._watch = watch
        #: how many times the watched file was found changed and reopened
        self.reopened = 0
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

    def _open(self) -> tuple[Store | None, tuple[int, int] | None, BaseException | None]:
        """Open the store: (store, its file's identity when watched, the
        error when it could not open)."""
        try:
            store = self._open_store()
        except BaseException as e:
            return None, None, e
        return store, None if self._watch is None else file_identity(self._watch), None

    def _stale(self, store: Store | None, opened: tuple[int, int] | None) -> bool:
        """Whether the watched store must be opened (again) before a job."""
        if self._watch is None:
            return False
        return store is None or file_identity(self._watch) != opened

    def _run(self) -> None:
        store, opened, open_error = self._open()
        deliver = self._reactor.callFromThread
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._stale(store, opened):
                if store is not None:
                    self.reopened += 1
                    store.close()
                store, opened, open_error = self._open()
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
