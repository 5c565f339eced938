"""Group commit: batches from every link, written together, acknowledged after.

Links hand their batches to L{BatchWriter.write} on the reactor thread. While
one transaction runs in the writer thread the next batches queue up; when it
commits, every batch in it is confirmed (in the order received) and the whole
queue goes into the next transaction. Under load that makes transactions
large and commits rare; when idle a lone batch is written at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmobserve._loglimit import LogLimiter

from ._store import Store

__all__ = ["BatchWriter", "JobRunner"]

T = TypeVar("T")


class JobRunner(Protocol):
    """Runs store jobs in order and reports each result (a L{StoreThread})."""

    def submit(self, job: Callable[[Store], T]) -> Deferred[T]: ...


#: Stop adding batches to one transaction past this many events.
MAX_TRANSACTION_EVENTS = 50_000


class _Pending:
    __slots__ = ("done", "events", "proxy_id", "seq")

    def __init__(
        self, proxy_id: str | None, seq: int | None, events: Sequence[Mapping[str, Any]]
    ) -> None:
        self.proxy_id = proxy_id
        self.seq = seq
        self.events = events
        self.done: Deferred[None] = Deferred()


class BatchWriter:
    """Queue of batches for one writer thread, committed in groups.

    @ivar stored: events in the store (set by L{set_stored} at start-up, then
        kept up to date from each commit's count of new rows).
    @ivar inserted: events stored since start-up (what L{stored} gained by
        commits, whatever retention took off since).
    @ivar duplicates: events received again and ignored since start-up.
    @ivar queued: events waiting for or inside the running transaction.
    @ivar rejected: events received since start-up that could not be stored
        and were stored as rejected records (resends of one count again).

    @param limiter: collapses repeated log lines (rejections, failures).
    """

    log = Logger()

    def __init__(self, thread: JobRunner, limiter: LogLimiter | None = None) -> None:
        self._thread = thread
        self._limiter = limiter
        self.rejected = 0
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self.stored = 0
        self.inserted = 0
        self.duplicates = 0
        self.queued = 0
        self.commits = 0

    def write(
        self,
        events: Sequence[Mapping[str, Any]],
        proxy_id: str | None = None,
        seq: int | None = None,
    ) -> Deferred[None]:
        """Store events; the Deferred fires once they are committed.

        @param proxy_id: with C{seq}, records C{seq} as that proxy's last
            acknowledged batch in the same transaction.
        """
        item = _Pending(proxy_id, seq, events)
        self._queue.append(item)
        self.queued += len(events)
        if not self._busy:
            self._next()
        return item.done

    def idle(self) -> bool:
        """Whether nothing is queued or being written."""
        return not self._busy and not self._queue

    def _next(self) -> None:
        if not self._queue:
            return
        take: list[_Pending] = []
        n = 0
        queue = self._queue
        while queue and (not take or n + len(queue[0].events) <= MAX_TRANSACTION_EVENTS):
            item = self._queue.popleft()
            take.append(item)
            n += len(item.events)
        events: list[Mapping[str, Any]] = []
        seqs: dict[str, int] = {}
        for item in take:
            events.extend(item.events)
            if item.proxy_id is not None and item.seq is not None:
                seqs[item.proxy_id] = item.seq
        self._busy = True

        def job(store: Store) -> tuple[int, list[tuple[str, str]]]:
            inserted = store.insert(events, seqs)
            return inserted, store.last_rejected

        self._thread.submit(job).addCallbacks(
            self._committed, self._failed, callbackArgs=(take, n), errbackArgs=(take, n)
        )

    def _committed(
        self, result: tuple[int, list[tuple[str, str]]], take: list[_Pending], n: int
    ) -> None:
        inserted, rejected = result
        self._busy = False
        self.rejected += len(rejected)
        for event_id, reason in rejected:
            if self._allow("rejected events"):
                self.log.warn(
                    "event {event_id!r} cannot be stored ({reason}): stored as rejected",
                    event_id=event_id[:80],
                    reason=reason,
                )
        self.queued -= n
        self.stored += inserted
        self.inserted += inserted
        self.duplicates += n - inserted
        self.commits += 1
        for item in take:
            item.done.callback(None)
        self._next()

    def _failed(self, failure: Failure, take: list[_Pending], n: int) -> None:
        self._busy = False
        self.queued -= n
        if self._allow("failed commits"):
            self.log.failure("writing {n} events failed; their links get no ack", failure, n=n)
        for item in take:
            item.done.errback(failure)
        self._next()

    def _allow(self, kind: str) -> bool:
        return self._limiter is None or self._limiter.allow(kind)
