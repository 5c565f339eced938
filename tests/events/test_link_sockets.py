"""The link for real: TCP on 127.0.0.1 against an in-process fake collector.

Collector down then up, a collector that stops reading, garbage from the
collector, draining on stop, replay after a restart, and one run against
the real collector service. Timings are scaled down (backoff cap 0.3 s,
heartbeat 0.5 s) so each test takes a second or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from events.eventkit import FakeCollector, eventually, fake_analyse, make_txn
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from llmobserve.events._link import CollectorLink
from llmobserve.events._spool import EventSpool
from llmobserve.events.pipeline import EventPipeline, make_event_sink

pytestmark = pytest.mark.timeout(30)


def free_port() -> int:
    port: IListeningPort = reactor.listenTCP(0, FakeCollector(), interface="127.0.0.1")
    number: int = cast(IPv4Address, port.getHost()).port
    port.stopListening()
    return number


def listen(collector: FakeCollector, port: int = 0) -> IListeningPort:
    listening: IListeningPort = reactor.listenTCP(port, collector, interface="127.0.0.1")
    return listening


def sink_for(port: int, spool_dir: Path, **kw: Any) -> EventPipeline:
    opts: dict[str, Any] = dict(
        collector_url=f"http://127.0.0.1:{port}",
        db_path=None,
        spool_dir=str(spool_dir),
        analyse=fake_analyse,
        log_events=False,
        backoff_initial=0.05,
        backoff_max=0.3,
        heartbeat_interval=0.5,
        ack_drain_timeout=3.0,
    )
    opts.update(kw)
    sink, _service = make_event_sink(reactor, **opts)
    assert isinstance(sink, EventPipeline)
    sink.startService()
    return sink


async def turn() -> None:
    await deferLater(reactor, 0, lambda: None)


async def feed(sink: EventPipeline, n: int, per_turn: int = 50) -> None:
    """Finish C{n} exchanges, C{per_turn} per reactor turn."""
    for i in range(n):
        sink.transaction_finished(make_txn(started_at=1_700_000_000.0 + i))
        if i % per_turn == per_turn - 1:
            await turn()


@pytest_twisted.ensureDeferred
async def test_collector_down_then_up_loses_nothing(tmp_path: Path) -> None:
    """1,000 exchanges while the collector is down all arrive once it is up (T25a)."""
    port = free_port()
    sink = sink_for(port, tmp_path)
    await feed(sink, 1000)
    await eventually(lambda: sink.pool.in_flight == 0)
    await deferLater(reactor, 0.5, lambda: None)  # a few failed attempts
    assert sink.delivery.reconnects >= 1
    assert sink.health()["collector"]["state"] == "down"
    assert sink.health()["events_waiting"] == 1000
    collector = FakeCollector()
    listening = listen(collector, port)
    try:
        await eventually(lambda: len(collector.seen) >= 1000, timeout=10, what="1000 ids")
        assert len(collector.seen) == 1000 and collector.duplicates == 0
        await eventually(lambda: sink.health()["events_waiting"] == 0)
        assert sink.health()["collector"]["state"] == "connected"
        await sink.stopService()
    finally:
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_collector_that_stops_reading_bounds_memory(tmp_path: Path) -> None:
    """A collector that welcomes, then never reads: memory stays bounded, calls stay
    instant, and everything is delivered once it reads again (T26)."""
    collector = FakeCollector()
    collector.stall = True
    collector.ack = False
    listening = listen(collector)
    window = 128 * 1024
    sink = sink_for(cast(IPv4Address, listening.getHost()).port, tmp_path, window_bytes=window)
    try:
        await eventually(lambda: bool(collector.stalled))
        await feed(sink, 4000)
        # all 4,000 calls came back while the collector read nothing and acknowledged
        # nothing: no call waits on the collector (a blocked one would never return)
        assert collector.stall and not collector.seen
        await eventually(lambda: sink.pool.in_flight == 0)
        peak_memory = peak_buffer = 0
        for _ in range(150):  # 1.5 s: several heartbeat timeouts and reconnects
            peak_memory = max(peak_memory, sink.outbox.memory_bytes)
            proto = sink.delivery._proto  # type: ignore[union-attr]  # a CollectorLink: no store
            if proto is not None and proto.transport is not None:
                t = cast(tcp.Connection, proto.transport)
                peak_buffer = max(peak_buffer, len(t.dataBuffer) + t._tempDataLen)
            await deferLater(reactor, 0.01, lambda: None)
        assert peak_memory <= window
        assert peak_buffer <= window + 64 * 1024
        assert sink.health()["events_waiting"] == 4000
        assert sink.delivery.reconnects >= 1  # the heartbeat noticed the silence
        collector.ack = True
        collector.unstall()
        await eventually(lambda: len(collector.seen) == 4000, timeout=15, what="4000 ids")
        await eventually(lambda: sink.health()["events_waiting"] == 0)
        await sink.stopService()
    finally:
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_garbage_from_the_collector_reconnects_and_loses_nothing(tmp_path: Path) -> None:
    """A garbage frame closes the link; the proxy reconnects and resends (T25c)."""
    collector = FakeCollector()
    collector.garbage_after = 2
    listening = listen(collector)
    sink = sink_for(cast(IPv4Address, listening.getHost()).port, tmp_path)
    try:
        await eventually(lambda: sink.delivery.connected)
        await feed(sink, 300, per_turn=10)
        await eventually(lambda: len(collector.seen) == 300, timeout=10, what="300 ids")
        await eventually(lambda: sink.health()["events_waiting"] == 0)
        assert isinstance(sink.delivery, CollectorLink) and sink.delivery.protocol_errors == 1
        assert len(collector.hellos) == 2
        await sink.stopService()
    finally:
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_stop_drains_to_the_collector(tmp_path: Path) -> None:
    """stopService returns only once every event is acknowledged (collector up)."""
    collector = FakeCollector()
    listening = listen(collector)
    sink = sink_for(cast(IPv4Address, listening.getHost()).port, tmp_path)
    try:
        await eventually(lambda: sink.delivery.connected)
        await feed(sink, 500, per_turn=500)
        await sink.stopService()
        assert len(collector.seen) == 500
        spool = EventSpool(tmp_path)
        assert spool.waiting == 0
        spool.close()
    finally:
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_stop_with_collector_down_keeps_events_for_the_next_start(tmp_path: Path) -> None:
    """With the collector away, stop is bounded and the spool replays on the next start."""
    port = free_port()
    sink = sink_for(port, tmp_path, ack_drain_timeout=0.5)
    await feed(sink, 200)
    # no acknowledgement can come: stop returns after ack_drain_timeout (were it to
    # wait for the acks, the test's timeout would end it)
    await sink.stopService()
    spool = EventSpool(tmp_path)
    assert spool.waiting == 200
    spool.close()

    collector = FakeCollector()
    listening = listen(collector, port)
    sink = sink_for(port, tmp_path)
    try:
        await eventually(lambda: len(collector.seen) == 200, timeout=10, what="replayed ids")
        assert collector.hellos[0]["proxy_id"] == sink.proxy_id
        await sink.stopService()
    finally:
        await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_against_the_real_collector(tmp_path: Path) -> None:
    """Events and spans reach the collector service's SQLite store, acked after commit."""
    from llmobserve.collector._service import CollectorService
    from llmobserve.collector._store import EventStore

    db = tmp_path / "collector.sqlite3"
    # create the file first: the service's two store threads racing to create
    # it can fail with "database is locked" (reported to the collector's owner)
    EventStore(db).close()
    service = CollectorService(
        reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), db, synchronous="NORMAL"
    )
    service.startService()
    port = await service.listening
    sink = sink_for(cast(IPv4Address, port.getHost()).port, tmp_path / "spool")
    try:
        await feed(sink, 300, per_turn=30)
        sink.spans_received([{"span_id": "sp", "start": 1.0, "end": 2.0}])
        await eventually(lambda: sink.events_total == 301 and sink.outbox.waiting == 0, timeout=10)
        await sink.stopService()
    finally:
        await service.stopService()
    store = EventStore(db)
    try:
        assert store.count() == 301
    finally:
        store.close()
