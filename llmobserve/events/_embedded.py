"""The no-collector mode: events go from the spool into a local SQLite store.

The store is the collector's own C{EventStore} (same schema, same report),
given as a factory by whoever builds the pipeline (C{llmobserve.proxy._tap}),
so this package never imports the collector; it is opened and used only in
one dedicated writer thread. The at-least-once rule
is the link's: a batch is acknowledged to the spool only after the store
committed it, and a failed write is retried from the spool.

Each commit has a fixed cost (about 20 us of CPU in the writer thread with
C{synchronous=NORMAL}, 60 us with C{FULL}, plus the thread hand-off), so
while events keep coming the writer commits at most every C{min_interval}
(50 ms) with everything that arrived meanwhile; a lone event after a quiet
spell is written at once.

Rows are made ahead: the parse threads turn each event into the store's row
(L{EmbeddedWriter.row_for}) while they have it in hand, and the writer
thread inserts those rows as they are. Decoding each payload again and
converting it there cost ~11 us per event, and in one call per batch that
held the GIL for milliseconds, which a request arriving meanwhile waited
out. A record without a row (read back from the spool after a restart, or
past C{max_rows}) is decoded and converted in the writer, a few at a time.

The store runs with C{synchronous=NORMAL}: in WAL mode a commit is then
durable against a crash of the process (the contract here: the spool's own
fsyncs are batched too), but the last commits before a power cut may be
lost, where C{FULL} would fsync on every commit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import msgpack
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmobserve.events._outbox import Outbox, Record
from llmobserve.events._pool import DaemonThreadPool
from llmobserve.events._waiters import after

__all__ = ["EmbeddedWriter", "StoreLike", "StoreReplaced"]

Row = tuple[Any, ...]
#: Records decoded in one call when rows must be made in the writer thread:
#: each call holds the GIL for its whole length.
_DECODE_CHUNK = 32


class StoreReplaced(Exception):
    """The store's file was removed or replaced since it was opened: the
    open connection writes into a file nobody will read again."""


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at C{path}; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class StoreLike(Protocol):
    """What the writer needs of C{llmobserve.collector._store.EventStore}."""

    def insert(self, events: Sequence[Mapping[str, Any]]) -> int: ...
    def close(self) -> None: ...


@runtime_checkable
class RowStoreLike(StoreLike, Protocol):
    """A store that also takes rows made ahead (C{EventStore} does)."""

    def row_for(self, event: Mapping[str, Any]) -> Row | None: ...
    def rows_for(self, events: Sequence[Mapping[str, Any]]) -> list[Row]: ...
    def insert_rows(
        self, rows: Sequence[Row], *, pause: Callable[[], None] | None = None
    ) -> int: ...


class EmbeddedWriter(Service):
    """Drains the outbox into an C{EventStore} in one writer thread.

    @ivar state: C{connecting} until the store is open, C{connected} while
        writes succeed, C{down} after a failed open or write (retried).
    @ivar error: why the last open or write failed; None once one succeeds.
    @ivar replaced_total: times the store's file was found removed or
        replaced (each time it was opened again and C{on_replaced} called).

    A failed write closes the store and the retry opens it again: a
    connection that failed (a store made read-only, then writable again)
    may never write again, a new one does (issue 13 item 5). Retries back
    off from C{retry_delay}, doubling up to C{retry_max}.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        outbox: Outbox,
        db_path: str,
        *,
        store_factory: Callable[[str], StoreLike],
        max_batch_records: int = 1000,
        max_batch_bytes: int = 4 * 1024 * 1024,
        retry_delay: float = 1.0,
        retry_max: float = 5.0,
        min_interval: float = 0.05,
        max_rows: int = 4000,
        pause: Callable[[], None] | None = None,
    ) -> None:
        self._reactor: IReactorFromThreads = reactor
        self.clock: IReactorTime = reactor
        self.outbox = outbox
        self.url = db_path
        self._factory = store_factory
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self._failures = 0  # in a row: the retry delay doubles with each
        self._file: tuple[int, int] | None = None  # the open store's file identity
        self.replaced_total = 0
        self.redelivered_total = 0
        #: called (reactor thread) when the store's file was found removed or
        #: replaced; returns how many events it sends again from the spool
        self.on_replaced: Callable[[], int] | None = None
        self.error: str | None = None
        self.min_interval = min_interval
        self.max_rows = max_rows
        self._pause = pause
        self.state = "connecting"
        self.write_errors = 0
        self._store: StoreLike | None = None
        self._busy: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._later: IDelayedCall | None = None  # a pump waiting for min_interval
        self._last_write = -math.inf
        # rows made ahead by the parse threads, by seq (reactor thread only)
        self._rows: dict[int, Row] = {}
        self._row_for: Callable[[Mapping[str, Any]], Row | None] | None = None
        self._row_store: _RowStore | None = None
        self._thread = DaemonThreadPool(minthreads=1, maxthreads=1, name="llmobserve-store")
        outbox.on_ready = self.pump

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    @property
    def reconnects(self) -> int:
        return 0

    @property
    def row_for(self) -> Callable[[Mapping[str, Any]], Row | None] | None:
        """The store's row maker, for the parse threads (None until a store
        that takes rows is open); it returns None for an event it leaves to
        the careful path."""
        return self._row_for

    def hold_row(self, seq: int, row: Row) -> None:
        """Keep the row made for record C{seq} until the record is written
        (reactor thread). Past C{max_rows} held, the row is dropped: the
        record is then converted in the writer thread."""
        if len(self._rows) < self.max_rows:
            self._rows[seq] = row

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._thread, fn, *args)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        self._thread.start()
        self._open()

    def _open(self) -> None:
        d = self._busy = self._in_thread(_open_store, self._factory, self.url)
        d.addCallbacks(self._opened, self._failed, errbackArgs=("opening",))

    def _opened(self, opened: tuple[StoreLike, tuple[int, int] | None]) -> None:
        self._busy = None
        store, self._file = opened
        self._store = store
        if isinstance(store, RowStoreLike):
            # settled once: a runtime-checkable protocol's isinstance costs
            # microseconds, too much for every write
            self._row_store = _RowStore(store)
            self._row_for = store.row_for
        self.state = "connected"
        if self.error is not None:
            self._log.info("event store {db} open again", db=self.url)
        self.pump()

    def _failed(self, failure: Failure, doing: str) -> None:
        self._busy = None
        if failure.check(StoreReplaced):
            self._replaced()
            return
        self.state = "down"
        self.write_errors += 1
        self.error = f"event store {doing} failed: {failure.getErrorMessage()}"
        self._log.failure(
            "event store {doing} failed: {db} (retry in {delay:g} s)",
            failure,
            doing=doing,
            db=self.url,
            delay=self._retry_delay(),
        )
        self.outbox.rewind()
        self._close_store()
        if self.running:
            self._retry = self.clock.callLater(self._retry_delay(), self._retry_now)
        self._failures += 1

    def _retry_delay(self) -> float:
        delay: float = self.retry_delay * 2.0 ** min(self._failures, 30)
        return min(delay, self.retry_max)

    def _replaced(self) -> None:
        """The store's file is gone (or another file took its name): close
        the old connection, open the file again at once, and have what the
        spool still holds of the lost file's events sent again."""
        self.replaced_total += 1
        self.state = "connecting"
        self.outbox.rewind()
        self._close_store()
        again = 0
        if self.on_replaced is not None:
            try:
                again = self.on_replaced()
            except Exception:
                self._log.failure("re-delivering from the spool failed")
        self.redelivered_total += again
        self._log.warn(
            "event store file {db} was removed or replaced: opened again; {n} events "
            "it held are sent again from the spool (older ones are no longer there)",
            db=self.url,
            n=again,
        )
        if self.running:
            self._retry = self.clock.callLater(0, self._retry_now)

    def _close_store(self) -> None:
        """Drop the open store (closed in its thread, before any reopening):
        the retry opens a new one."""
        store, self._store = self._store, None
        self._row_store = self._row_for = None
        self._rows.clear()
        if store is not None:
            closing = self._in_thread(store.close)
            closing.addErrback(lambda f: self._log.failure("closing the event store failed", f))

    def _retry_now(self) -> None:
        self._retry = None
        if self._store is None:
            self._open()
        else:
            self.pump()

    def pump(self) -> None:
        """Hand what is ready to the writer thread, unless a write is under way
        (its completion pumps again, so events coalesce into one batch) or
        the last one started less than C{min_interval} ago (then a pump is
        scheduled for when it is due, unless a full batch is waiting)."""
        if (
            not self.running
            or self._busy is not None
            or self._store is None
            or self._retry is not None
            or self._later is not None
        ):
            return
        now = self.clock.seconds()
        due = self._last_write + self.min_interval
        if now < due and self.outbox.waiting < self.max_batch_records:
            self._later = self.clock.callLater(due - now, self._pump_later)
            return
        records = self.outbox.take(self.max_batch_records, self.max_batch_bytes)
        if not records:
            return
        self._last_write = now
        rows = [self._rows.pop(seq, None) for seq, _ in records] if self._rows else None
        store = self._store if self._row_store is None else self._row_store
        d = self._busy = self._in_thread(
            _insert_checked, self.url, self._file, store, records, rows, self._pause
        )
        d.addCallbacks(
            self._written, self._failed, callbackArgs=(records[-1][0],), errbackArgs=("write",)
        )

    def _pump_later(self) -> None:
        self._later = None
        self.pump()

    def _written(self, _count: int, last_seq: int) -> None:
        self._busy = None
        self.state = "connected"
        if self.error is not None:
            self._log.info("event store {db} writable again", db=self.url)
            self.error = None
        self._failures = 0
        if len(self._rows) > self.max_rows // 2:
            # rows whose record was never taken (it cannot be now): do not
            # let them crowd out the rows of records still to come
            self._rows = {seq: row for seq, row in self._rows.items() if seq > last_seq}
        self.outbox.ack(last_seq)
        self.pump()

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Finish the write under way, close the store in its thread, stop."""
        super().stopService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        while self._busy is not None:
            yield after(self._busy)
        store, self._store = self._store, None
        self._row_store = self._row_for = None
        try:
            if store is not None:
                yield self._in_thread(store.close)
        except Exception:
            self._log.failure("closing the event store failed")
        finally:
            self.state = "down"
            self._thread.stop()


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _unpack(records: Sequence[Record]) -> list[Any]:
    """The events of C{records}, decoded in one call.

    Each payload is one packed map, so a msgpack array header followed by
    the payloads is the packed list of them: one C{unpackb} call costs about
    a third less than one per record. Should that fail (a payload that is
    not one whole msgpack object), each record is decoded on its own, so the
    error names the bad one as before.
    """
    try:
        events: list[Any] = msgpack.unpackb(
            _array_header(len(records)) + b"".join([payload for _seq, payload in records]),
            raw=False,
            strict_map_key=False,
        )
    except Exception:
        events = [
            msgpack.unpackb(payload, raw=False, strict_map_key=False) for _seq, payload in records
        ]
    return events


def _decode(records: Sequence[Record]) -> list[Any]:
    """The events of C{records}, C{_DECODE_CHUNK} at a time (each decoding
    call holds the GIL throughout)."""
    events: list[Any] = []
    for i in range(0, len(records), _DECODE_CHUNK):
        events.extend(_unpack(records[i : i + _DECODE_CHUNK]))
    return events


@attrs.frozen
class _RowStore:
    """A store known (since it opened) to take rows made ahead."""

    store: RowStoreLike


def _open_store(
    factory: Callable[[str], StoreLike], path: str
) -> tuple[StoreLike, tuple[int, int] | None]:
    """The writer thread's open: the store and its file's identity."""
    store = factory(path)
    return store, file_identity(path)


def _insert_checked(
    path: str,
    identity: tuple[int, int] | None,
    store: StoreLike | _RowStore,
    records: Sequence[Record],
    rows: list[Row | None] | None,
    pause: Callable[[], None] | None,
) -> int:
    """L{_insert}, unless the store's file was removed or replaced since it
    was opened (one C{stat} per batch; skipped for a store without a file).

    @raise StoreReplaced: it was.
    """
    if identity is not None and file_identity(path) != identity:
        raise StoreReplaced(path)
    return _insert(store, records, rows, pause)


def _insert(
    store: StoreLike | _RowStore,
    records: Sequence[Record],
    rows: list[Row | None] | None,
    pause: Callable[[], None] | None,
) -> int:
    """The writer thread's job: store C{records}, using the rows made ahead
    (C{rows[i]} for C{records[i]}, None where there is none), with C{pause}
    between chunks of rows."""
    if not isinstance(store, _RowStore):
        return store.insert(_decode(records))
    store = store.store
    if rows is None:
        rows = [None] * len(records)
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        made = store.rows_for(_decode([records[i] for i in missing]))
        for i, row in zip(missing, made, strict=True):
            rows[i] = row
    try:
        return store.insert_rows(rows, pause=pause)  # type: ignore[arg-type]  # no None left
    except OverflowError:  # an integer beyond 64 bits: the careful path
        return store.insert(_decode(records))
