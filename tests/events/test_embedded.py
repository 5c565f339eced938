"""The embedded writer: batch decoding and commit pacing (real reactor and thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from events.eventkit import FakeStore, eventually
from twisted.internet import reactor
from twisted.python.failure import Failure

from llmobserve.events._embedded import EmbeddedWriter, _unpack
from llmobserve.events._outbox import Outbox

pytestmark = pytest.mark.timeout(30)


def _pack(event: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(event, use_bin_type=True)
    return packed


@pytest.mark.parametrize("n", [1, 15, 16, 300, 70_000])
def test_unpack_a_batch_in_one_call(n: int) -> None:
    """Records decode to their events in order, whatever the array header size."""
    records = [(i, _pack({"id": f"e{i}", "n": i, "b": b"\x00"})) for i in range(n)]
    events = _unpack(records)
    assert len(events) == n
    assert events[0] == {"id": "e0", "n": 0, "b": b"\x00"}
    assert events[-1]["id"] == f"e{n - 1}"


def test_unpack_a_bad_record_raises_as_before() -> None:
    """A payload that is not one msgpack object still fails the batch (and is retried)."""
    records = [(0, _pack({"id": "a"})), (1, _pack({"id": "b"})[:-1])]
    with pytest.raises(ValueError):
        _unpack(records)


@pytest_twisted.ensureDeferred
async def test_events_in_a_burst_share_commits(tmp_path: Path) -> None:
    """While events keep coming, commits are at most every min_interval; a lone one goes at once."""
    stores: list[FakeStore] = []

    def factory(path: str) -> FakeStore:
        stores.append(FakeStore(path))
        return stores[-1]

    outbox = Outbox(acked_seq=0, last_seq=0)
    writer = EmbeddedWriter(
        reactor, outbox, str(tmp_path / "x"), store_factory=factory, min_interval=0.2
    )
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        outbox.offer(1, _pack({"id": "first"}))  # after a quiet spell: written at once
        writer.pump()
        await eventually(lambda: outbox.acked_seq == 1, timeout=0.15)
        for seq in range(2, 102):
            outbox.offer(seq, _pack({"id": f"e{seq}"}))
            writer.pump()
        await eventually(lambda: outbox.acked_seq == 101)
        assert len(stores[0].events) == 101
        assert stores[0].inserts <= 3
    finally:
        await writer.stopService()
    assert stores[0].closed


class RowStore(FakeStore):
    """A FakeStore that also takes rows made ahead; rows are (id, event) here."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.row_inserts: list[list[Any]] = []
        self.refuse_rows = False

    @staticmethod
    def row_for(event: dict[str, Any]) -> tuple[Any, ...] | None:
        return None if event.get("careful") else (event["id"], event)

    def rows_for(self, events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["id"], e) for e in events]

    def insert_rows(self, rows: list[tuple[Any, ...]], pause: Any = None) -> int:
        if self.refuse_rows:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        self.row_inserts.append(list(rows))
        return self.insert([event for _id, event in rows])


async def _written_through(
    tmp_path: Path, offers: list[tuple[int, dict[str, Any], bool]], refuse: bool = False
) -> RowStore:
    """Offer (seq, event, with a row made ahead?) records; wait until all are acknowledged."""
    stores: list[RowStore] = []

    def factory(path: str) -> RowStore:
        stores.append(RowStore(path))
        stores[-1].refuse_rows = refuse
        return stores[-1]

    outbox = Outbox(acked_seq=0, last_seq=0)
    writer = EmbeddedWriter(reactor, outbox, str(tmp_path / "x"), store_factory=factory)
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        assert writer.row_for is RowStore.row_for
        for seq, event, ahead in offers:
            if ahead:
                row = writer.row_for(event)
                assert row is not None
                writer.hold_row(seq, row)
            outbox.offer(seq, _pack(event))
        writer.pump()
        await eventually(lambda: outbox.acked_seq == offers[-1][0])
    finally:
        await writer.stopService()
    return stores[0]


@pytest_twisted.ensureDeferred
async def test_rows_made_ahead_are_written_as_they_are(tmp_path: Path) -> None:
    """Held rows go to insert_rows untouched; a record without one (read back
    from the spool, say) gets its row from its decoded payload."""
    store = await _written_through(
        tmp_path, [(1, {"id": "a"}, True), (2, {"id": "b"}, False), (3, {"id": "c"}, True)]
    )
    assert store.row_inserts == [[("a", {"id": "a"}), ("b", {"id": "b"}), ("c", {"id": "c"})]]
    assert sorted(store.events) == ["a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_rows_the_store_refuses_go_the_careful_way(tmp_path: Path) -> None:
    """insert_rows raising OverflowError (an integer beyond 64 bits) sends
    the batch, decoded, through insert: nothing is lost."""
    store = await _written_through(tmp_path, [(1, {"id": "a"}, True), (2, {"id": "b"}, True)], True)
    assert store.row_inserts == []
    assert sorted(store.events) == ["a", "b"]


def test_rows_past_max_rows_are_not_held(tmp_path: Path) -> None:
    """Held rows are bounded: past max_rows, the writer thread converts the record itself."""
    writer = EmbeddedWriter(
        reactor, Outbox(acked_seq=0, last_seq=0), "x", store_factory=RowStore, max_rows=2
    )
    for seq in range(1, 5):
        writer.hold_row(seq, ("row",))
    assert sorted(writer._rows) == [1, 2]


def test_the_real_store_makes_a_row_ahead_for_an_ordinary_call() -> None:
    """The common event (a parsed call) takes the fast path: a row is made ahead."""
    from events.eventkit import make_txn

    from llmobserve.collector._store import EventStore
    from llmobserve.events._record import build_call_event

    event = build_call_event(make_txn(), None, event_id="e" * 32, proxy_id="p")
    assert EventStore.row_for(event) is not None


@pytest_twisted.ensureDeferred
async def test_rows_of_records_never_taken_are_let_go(tmp_path: Path) -> None:
    """Rows held for seqs that are already acknowledged (their record will
    never be taken) are dropped once held rows pass half of max_rows."""
    outbox = Outbox(acked_seq=10, last_seq=10)
    writer = EmbeddedWriter(
        reactor, outbox, str(tmp_path / "x"), store_factory=RowStore, max_rows=4
    )
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        for stale in (1, 2, 3):
            writer.hold_row(stale, (f"s{stale}", {"id": f"s{stale}"}))
        writer.hold_row(11, ("e11", {"id": "e11"}))
        outbox.offer(11, _pack({"id": "e11"}))
        writer.pump()
        await eventually(lambda: outbox.acked_seq == 11)
        assert writer._rows == {}
    finally:
        await writer.stopService()


class _ReadOnlyUntilReopened(FakeStore):
    """A store whose connection, once it failed a write because the file was
    read-only, keeps failing after the file is writable again (SQLite's
    behaviour in the trial); a store opened after that writes."""

    read_only = False

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.broken = False

    def insert(self, events: Any) -> int:
        if self.broken or _ReadOnlyUntilReopened.read_only:
            self.broken = True
            raise OSError("attempt to write a readonly database")
        return super().insert(events)


@pytest_twisted.ensureDeferred
async def test_a_store_that_was_read_only_is_reopened_and_heals(tmp_path: Path) -> None:
    """Issue 13 item 5: after a failed write the store is closed and opened
    again (with backoff), so once the file is writable again the events
    waiting are written; before, the old connection was retried forever."""
    stores: list[_ReadOnlyUntilReopened] = []

    def factory(path: str) -> _ReadOnlyUntilReopened:
        stores.append(_ReadOnlyUntilReopened(path))
        return stores[-1]

    outbox = Outbox(acked_seq=0, last_seq=0)
    writer = EmbeddedWriter(
        reactor,
        outbox,
        str(tmp_path / "x"),
        store_factory=factory,
        retry_delay=0.02,
        retry_max=0.08,
        min_interval=0,
    )
    _ReadOnlyUntilReopened.read_only = True
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        for seq in range(1, 11):
            outbox.offer(seq, _pack({"id": f"e{seq}"}))
        writer.pump()
        await eventually(lambda: writer.write_errors >= 4)
        assert writer.state == "down"
        assert writer.error is not None and "readonly" in writer.error
        assert outbox.acked_seq == 0
        assert stores[0].closed, "the failed connection is closed"
        _ReadOnlyUntilReopened.read_only = False
        await eventually(lambda: outbox.acked_seq == 10)
        assert writer.error is None and writer.connected
        assert len(stores[-1].events) == 10
        assert all(store.closed for store in stores[:-1])
    finally:
        _ReadOnlyUntilReopened.read_only = False
        await writer.stopService()


def test_store_retries_back_off_up_to_retry_max() -> None:
    """Each failed retry doubles the delay, up to retry_max; a success resets it."""
    from twisted.internet.task import Clock

    from llmobserve.events._embedded import EmbeddedWriter as Writer

    clock = Clock()
    writer = Writer(
        clock,
        Outbox(acked_seq=0, last_seq=0),
        "x",
        store_factory=FakeStore,
        retry_delay=1.0,
        retry_max=4.0,
    )
    writer.running = True  # no threads: only the retry schedule is looked at
    delays = []
    for _ in range(5):
        writer._failed(Failure(OSError("no")), "opening")
        assert writer._retry is not None
        delays.append(writer._retry.getTime() - clock.seconds())
        writer._retry.cancel()
        writer._retry = None
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    writer._written(0, 0)
    writer._failed(Failure(OSError("no")), "opening")
    assert writer._retry is not None and writer._retry.getTime() - clock.seconds() == 1.0
    writer._retry.cancel()


@pytest_twisted.ensureDeferred
async def test_a_store_file_removed_is_reopened_and_the_spool_replayed(tmp_path: Path) -> None:
    """Issue 13 item 2: before each write the writer checks that its file is
    still the one it opened; a removed file is closed, opened again at once
    (no failure counted), and C{on_replaced} asked to send events again."""
    stores: list[FakeStore] = []
    path = tmp_path / "events.db"

    def factory(p: str) -> FakeStore:
        Path(p).touch()
        stores.append(FakeStore(p))
        return stores[-1]

    outbox = Outbox(acked_seq=0, last_seq=0)
    writer = EmbeddedWriter(reactor, outbox, str(path), store_factory=factory, min_interval=0)
    replays: list[int] = []

    def replay() -> int:
        replays.append(outbox.acked_seq)
        outbox.replay(0)
        return 3

    writer.on_replaced = replay
    outbox.read_after = lambda after, n, size: _read(records, after)
    records = [(seq, _pack({"id": f"e{seq}"})) for seq in range(1, 7)]
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        for seq, payload in records[:3]:
            outbox.offer(seq, payload)
        writer.pump()
        await eventually(lambda: outbox.acked_seq == 3)
        path.unlink()
        for seq, payload in records[3:]:
            outbox.offer(seq, payload)
        writer.pump()
        await eventually(lambda: outbox.acked_seq == 6 and len(stores) == 2)
        assert replays == [3]
        assert writer.replaced_total == 1 and writer.redelivered_total == 3
        assert writer.write_errors == 0 and writer.error is None
        assert stores[0].closed
        assert sorted(stores[1].events) == [f"e{seq}" for seq in range(1, 7)]
    finally:
        await writer.stopService()


def _read(records: list[tuple[int, bytes]], after: int) -> Any:
    from twisted.internet.defer import succeed

    got = [r for r in records if r[0] > after]
    return succeed((got, records[-1][0]))
