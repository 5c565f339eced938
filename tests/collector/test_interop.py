"""The proxy's event pipeline (llmobserve.events) talking to this collector.

Both sides were written from docs/LINK.md by different hands; this pins that
they agree: the proxy's real CollectorLink connects to the real collector
service (in-process, real reactor, real threads, loopback), and every event
and span the proxy produced is stored once, with the DESIGN.md fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from events.eventkit import (
    eventually,
    fake_analyse,
    make_txn,
)
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from llmobserve.collector._service import CollectorService
from llmobserve.collector._store import EventStore
from llmobserve.events.pipeline import make_event_sink

pytestmark = pytest.mark.timeout(60)


@pytest_twisted.ensureDeferred
async def test_proxy_pipeline_to_collector(tmp_path: Path) -> None:
    """300 calls and a span go from the proxy's sink through the link into the store."""
    db = tmp_path / "collector.sqlite3"
    EventStore(db).close()
    collector = CollectorService(
        reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), db, heartbeat=5.0
    )
    collector.startService()
    port = await collector.listening
    sink: Any = None
    try:
        address: Any = port.getHost()
        sink, _ = make_event_sink(
            reactor,
            collector_url=f"http://127.0.0.1:{address.port}",
            db_path=None,
            spool_dir=str(tmp_path / "spool"),
            analyse=fake_analyse,
            log_events=False,
        )
        sink.startService()
        for i in range(300):
            sink.transaction_finished(make_txn(started_at=1_750_000_000.0 + i))
        sink.spans_received([{"span_id": "s1", "run_id": "r1", "name": "plan", "start": 1.0}])
        await eventually(lambda: collector.writer.stored == 301, timeout=20, what="301 stored")
        await eventually(lambda: sink.outbox.waiting == 0, timeout=10, what="all acked")
        links = collector.links.describe()
        assert len(links) == 1 and links[0]["proxy_id"]
        assert collector.links.protocol_errors == 0
    finally:
        if sink is not None:
            await sink.stopService()
        await collector.stopService()

    store = EventStore(db)
    try:
        assert store.count() == 301
        calls = store.events(kind="call", limit=None)
        assert len({e["id"] for e in calls}) == 300
        first = calls[0]
        for field in ("ts", "method", "host", "path", "status", "outcome", "usage", "context"):
            assert field in first
        assert first["usage"] == {"input_tokens": 3, "output_tokens": 5}
        (span,) = store.events(kind="span")
        assert span["context"]["run_id"] == "r1"
        assert store.events(kind="span", run="r1") == [span]
        assert list(store.links().values()) != []
    finally:
        store.close()
