"""The sink on the real reactor with real threads, in embedded mode.

The parse pool (full queue, raising parsers, drain), spans, gap records and
the embedded store's at-least-once rule. The store is a fake with the
EventStore interface except in the last test, which uses the real one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytest_twisted
from events.eventkit import FakeStore, FakeUsage, eventually, fake_analyse, make_txn
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface.verify import verifyObject

from llmobserve.events._spool import EventSpool
from llmobserve.events.pipeline import EventPipeline, make_event_sink
from llmobserve.transaction import ITransactionSink

pytestmark = pytest.mark.timeout(30)


class Sink:
    """A started embedded-mode pipeline over a FakeStore."""

    def __init__(self, tmp_path: Path, analyse: Callable[[Any], Any] = fake_analyse, **kw: Any):
        self.stores: list[FakeStore] = []

        def factory(path: str) -> FakeStore:
            store = FakeStore(path)
            self.stores.append(store)
            return store

        opts: dict[str, Any] = dict(
            collector_url=None,
            db_path=str(tmp_path / "events.sqlite3"),
            spool_dir=str(tmp_path / "spool"),
            parse_workers=2,
            parse_queue=100,
            analyse=analyse,
            store_factory=factory,
            log_events=False,
        )
        opts.update(kw)
        sink, service = make_event_sink(reactor, **opts)
        assert isinstance(sink, EventPipeline) and sink is service
        self.sink: EventPipeline = sink
        sink.startService()

    @property
    def store(self) -> FakeStore:
        return self.stores[0]

    def stored(self) -> list[dict[str, Any]]:
        # a store reopened after a failed write is the same file: one view
        merged: dict[str, dict[str, Any]] = {}
        for store in self.stores:
            merged.update(store.events)
        return list(merged.values())


def test_sink_provides_the_interface(tmp_path: Path) -> None:
    sink, _ = make_event_sink(
        reactor, collector_url="http://127.0.0.1:9", db_path=None, spool_dir=str(tmp_path)
    )
    verifyObject(ITransactionSink, sink)
    assert isinstance(sink, EventPipeline)
    assert sink.store_path is None  # a collector stores them: no /api here
    assert sink.health() == {
        "collector": {
            "mode": "link",
            "state": "connecting",
            "url": "http://127.0.0.1:9",
            "refused": None,  # or why the collector refused the link (unauthorized)
            "urls": ["http://127.0.0.1:9"],  # every --collector; url is the one in use
        },
        "events_waiting": 0,
    }
    sink.spool.close()


def test_a_refused_link_key_degrades_health_a_key_store_outage_does_not(
    tmp_path: Path,
) -> None:
    """A collector that refuses the link's key (unauthorized) keeps every
    event in the spool for good, until the key is fixed: /health says so.
    One that could not read its own keys for a while (key_check_unavailable)
    is retried like an outage: no reason to page anyone about the key."""
    sink, _ = make_event_sink(
        reactor, collector_url="http://127.0.0.1:9", db_path=None, spool_dir=str(tmp_path)
    )
    assert isinstance(sink, EventPipeline)
    link: Any = sink.delivery
    link.refused = "unauthorized"
    health = sink.health()
    assert health["status"] == "degraded"
    assert any("--collector-key" in reason for reason in health["degraded"])
    link.refused = "key_check_unavailable"
    assert "status" not in sink.health()
    sink.spool.close()


def test_sink_parses_in_one_thread_by_default(tmp_path: Path) -> None:
    """
    C{make_event_sink} gives the parse pool one thread unless told
    otherwise: on the proxy's one core a second parse thread only added GIL
    hand-offs (more CPU per request at c=64, measured A/B).
    """
    sink, _ = make_event_sink(
        reactor, collector_url="http://127.0.0.1:9", db_path=None, spool_dir=str(tmp_path)
    )
    assert isinstance(sink, EventPipeline)
    assert sink.pool.workers == 1
    sink.spool.close()
    two, _ = make_event_sink(
        reactor,
        collector_url="http://127.0.0.1:9",
        db_path=None,
        spool_dir=str(tmp_path / "two"),
        parse_workers=2,
    )
    assert isinstance(two, EventPipeline)
    assert two.pool.workers == 2
    two.spool.close()


@pytest_twisted.ensureDeferred
async def test_full_parse_queue_records_parse_skipped_without_waiting(tmp_path: Path) -> None:
    """Over workers + queue, exchanges are recorded unparsed at once, never delayed."""
    gate = threading.Event()
    parsed: list[str] = []

    def slow(exchange: Any) -> FakeUsage:
        gate.wait(10)
        parsed.append(exchange.path)
        return fake_analyse(exchange)

    s = Sink(tmp_path, slow, parse_workers=1, parse_queue=2)
    for i in range(10):
        s.sink.transaction_finished(make_txn(started_at=1000.0 + i))
    # every call returned while the one worker is still held at the gate: none waited for a parse
    assert parsed == [] and not gate.is_set()
    assert s.sink.parse_skipped_total == 7
    await eventually(lambda: len(s.stored()) == 7, what="skipped events stored")
    skipped = s.stored()
    assert all(e["usage_source"] == "missing" and "parse_skipped" in e["flags"] for e in skipped)
    gate.set()
    await eventually(lambda: len(s.stored()) == 10, what="all events stored")
    reported = [e for e in s.stored() if e["usage_source"] == "reported"]
    assert len(reported) == 3
    metrics = {name: value for name, _t, _h, value in s.sink.metrics()}
    assert metrics["llmobserve_parse_skipped_total"] == 7
    assert metrics["llmobserve_events_total"] == 10
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_parser_exceptions_become_parse_error(tmp_path: Path) -> None:
    """A raising parser, or one reporting an error, still yields one event each."""

    def analyse(exchange: Any) -> FakeUsage:
        if exchange.path == "/raise":
            raise ValueError("boom\nline two")
        if exchange.path == "/reported":
            return FakeUsage(usage={}, usage_source="missing", parse_error="bad json")
        return fake_analyse(exchange)

    s = Sink(tmp_path, analyse)
    for path in ("/raise", "/reported", "/fine"):
        s.sink.transaction_finished(make_txn(path=path))
    await eventually(lambda: len(s.stored()) == 3)
    by_path = {e["path"]: e for e in s.stored()}
    assert by_path["/raise"]["parse_error"] == "ValueError: boom\\u000aline two"
    assert by_path["/raise"]["usage_source"] == "missing"
    assert by_path["/reported"]["parse_error"] == "bad json"
    assert by_path["/fine"]["parse_error"] is None
    assert s.sink.parse_errors_total == 2
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_spans_travel_the_same_path(tmp_path: Path) -> None:
    s = Sink(tmp_path)
    s.sink.spans_received([{"span_id": "a", "name": "n", "start": 1.0, "end": 2.0}, "junk"])  # type: ignore[list-item]  # junk on purpose
    await eventually(lambda: len(s.stored()) == 1)
    [span] = s.stored()
    assert span["kind"] == "span" and span["context"]["span_id"] == "a"
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_store_failure_is_retried_from_the_spool(tmp_path: Path) -> None:
    """Embedded mode acks the spool only after the store committed; failures retry."""
    s = Sink(tmp_path)
    await eventually(lambda: bool(s.stores))
    s.sink.delivery.retry_delay = 0.05  # type: ignore[union-attr]  # the EmbeddedWriter
    s.store.fail_next = 2
    for i in range(50):
        s.sink.transaction_finished(make_txn(started_at=2000.0 + i))
    await eventually(lambda: len(s.stored()) == 50)
    assert s.sink.delivery.state == "connected"
    await eventually(lambda: s.sink.outbox.waiting == 0)
    assert s.sink.health()["events_waiting"] == 0
    assert len(s.stores) == 2  # the failed write closed its store; the retry opened one
    await s.sink.stopService()
    assert all(store.closed for store in s.stores)


@pytest_twisted.ensureDeferred
async def test_full_spool_drops_with_a_counted_gap_record(tmp_path: Path) -> None:
    """A full spool drops new events, counts them, and says so in a gap record."""
    s = Sink(tmp_path, spool_max_bytes=40_000)
    await eventually(lambda: bool(s.stores))
    s.store.gate.clear()  # the store hangs: nothing is acknowledged
    for i in range(400):
        s.sink.transaction_finished(make_txn(started_at=3000.0 + i))
    await eventually(lambda: s.sink.pool.in_flight == 0)
    dropped = s.sink.events_dropped_total
    assert dropped > 0 and s.sink.spool.total_bytes <= 40_000
    s.store.gate.set()

    def gap_total() -> int:
        return sum(e["dropped"] for e in s.stored() if e["kind"] == "gap")

    await eventually(lambda: gap_total() == dropped, what="gap records adding up")
    calls = [e for e in s.stored() if e["kind"] == "call"]
    assert len(calls) + dropped == 400
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_a_filling_spool_drops_class_1_first(tmp_path: Path) -> None:
    """T26's small-spool phase: calls to unknown hosts (class 1) are refused in the
    last tenth under the cap, calls to known providers (class 0) still fit there."""

    def by_host(exchange: Any) -> FakeUsage:
        known = exchange.host == "api.openai.com"
        return FakeUsage(
            provider="openai" if known else "unknown",
            usage={"input_tokens": 3, "output_tokens": 5},
        )

    s = Sink(tmp_path, analyse=by_host, spool_max_bytes=60_000, parse_queue=1000)
    await eventually(lambda: bool(s.stores))
    s.store.gate.clear()  # nothing is acknowledged: the spool only fills
    for i in range(300):
        s.sink.transaction_finished(make_txn(host="example.net", started_at=4000.0 + i))
    await eventually(lambda: s.sink.pool.in_flight == 0)
    unknown_dropped = s.sink.events_dropped_total
    assert unknown_dropped > 0
    assert s.sink.spool.total_bytes <= 60_000 * 0.9, "class 1 stops short of the reserve"
    for i in range(8):  # ~600 bytes each: the reserve holds ten
        s.sink.transaction_finished(make_txn(started_at=5000.0 + i))  # api.openai.com
    await eventually(lambda: s.sink.pool.in_flight == 0)
    assert s.sink.events_dropped_total == unknown_dropped, "the reserve took every class 0 call"
    s.store.gate.set()

    def gap_total() -> int:
        return sum(e["dropped"] for e in s.stored() if e["kind"] == "gap")

    await eventually(lambda: gap_total() == unknown_dropped, what="gap records adding up")
    calls = [e for e in s.stored() if e["kind"] == "call"]
    assert sum(e["provider"] == "openai" for e in calls) == 8
    assert len(calls) + unknown_dropped == 308
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_a_slow_parse_holds_up_no_other_event(tmp_path: Path) -> None:
    """Events parsed after a slow one are delivered while it is still parsing."""
    release = threading.Event()

    def analyse(exchange: Any) -> FakeUsage:
        if exchange.path == "/slow":
            release.wait(10)
        return fake_analyse(exchange)

    s = Sink(tmp_path, analyse)
    s.sink.transaction_finished(make_txn(path="/slow"))
    await deferLater(reactor, 0.05, lambda: None)
    for _ in range(10):
        s.sink.transaction_finished(make_txn(path="/fast"))
    await eventually(lambda: len(s.stored()) == 10, what="the fast events")
    assert {e["path"] for e in s.stored()} == {"/fast"}
    release.set()
    await eventually(lambda: len(s.stored()) == 11)
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_parses_and_bounds_a_stuck_one(tmp_path: Path) -> None:
    """stopService waits for running parses, but a stuck parser costs only the deadline."""
    release = threading.Event()

    def analyse(exchange: Any) -> FakeUsage:
        if exchange.path == "/stuck":
            release.wait(20)
        else:
            time.sleep(0.2)
        return fake_analyse(exchange)

    s = Sink(tmp_path, analyse, parse_drain_timeout=0.5)
    s.sink.transaction_finished(make_txn(path="/slow"))
    s.sink.transaction_finished(make_txn(path="/stuck"))
    await s.sink.stopService()
    # stop returned while the stuck parse is still stuck: it waited the deadline, not the parse
    assert not release.is_set()
    release.set()
    by_path = {e["path"]: e for e in s.stored()}
    assert by_path["/slow"]["usage_source"] == "reported"
    assert "parse_timeout" in by_path["/stuck"]["flags"]
    spool = EventSpool(tmp_path / "spool")
    assert spool.waiting == 0  # both were committed and acknowledged before the stop ended
    spool.close()


@pytest_twisted.ensureDeferred
async def test_embedded_mode_with_the_real_event_store(tmp_path: Path) -> None:
    """Without a collector, events land in the collector's own SQLite store,
    opened by the factory the proxy's tap passes in."""
    from llmobserve.collector import EventStore
    from llmobserve.proxy._tap import open_embedded_store

    db = tmp_path / "events.sqlite3"
    sink, _ = make_event_sink(
        reactor,
        collector_url=None,
        db_path=str(db),
        spool_dir=str(tmp_path / "spool"),
        analyse=fake_analyse,
        log_events=False,
        store_factory=open_embedded_store,
    )
    assert isinstance(sink, EventPipeline)
    assert sink.store_path == str(db)  # the file the proxy's /api reads
    sink.startService()
    for i in range(200):
        sink.transaction_finished(make_txn(started_at=4000.0 + i))
    sink.spans_received([{"span_id": "s", "start": 1.0}])
    await eventually(lambda: sink.outbox.waiting == 0 and sink.events_total == 201)
    assert sink.health()["collector"]["state"] == "connected"
    await sink.stopService()
    store = EventStore(db)
    try:
        assert store.count() == 201
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_one_log_event_per_batch_one_line_per_call(tmp_path: Path) -> None:
    """Parsed calls are logged as one line each, gathered into one log event per batch."""
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "calls" in event:
            seen.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        s = Sink(tmp_path, log_events=True, parse_gather=0.05)
        for i in range(3):
            s.sink.transaction_finished(make_txn(started_at=1000.0 + i, path=f"/v1/x{i}"))
        await eventually(lambda: len(s.stored()) == 3)
        await s.sink.stopService()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))
    assert len(seen) == 1
    assert seen[0]["calls"].split("\n") == [
        f"POST api.openai.com/v1/x{i} -> 200 ok openai gpt-4o-2024-08-06 "
        "in=3 out=5 cost=0.000125 ms=200.0"
        for i in range(3)
    ]


@pytest_twisted.ensureDeferred
async def test_the_stop_summary_counts_calls_not_forwarded_apart(tmp_path: Path) -> None:
    """The shutdown line counted a call the proxy refused as one of its calls, and
    unpriced, while the report counts it apart: it is named apart here too."""
    from llmobserve.transaction import Outcome

    s = Sink(tmp_path)
    s.sink.transaction_finished(make_txn())
    s.sink.transaction_finished(make_txn(outcome=Outcome.REFUSED, status=403, response_body=b""))
    s.sink.transaction_finished(make_txn(outcome=Outcome.PROXY_ERROR, status=502))
    await eventually(lambda: len(s.stored()) == 3)
    line = s.sink.stop_summary(3)
    await s.sink.stopService()
    assert line.startswith("llmobserve proxy stopped: 1 call, $")
    assert line.endswith(
        "unpriced, 2 refused or not forwarded; events: 3 delivered to the embedded store, "
        "0 waiting in the spool for the next start"
    )
    assert "proxy stopped: 3 calls" not in line


@pytest_twisted.ensureDeferred
async def test_the_stop_summary_counts_budget_refusals_apart(tmp_path: Path) -> None:
    """A budget's 402 (outcome budget_refused) was one of the stop line's calls,
    and unpriced, while the report counts it on its refused line: 23 calls and
    12 unpriced against the report's 11 calls and 12 refused."""
    from llmobserve.transaction import Outcome

    s = Sink(tmp_path)
    s.sink.transaction_finished(make_txn())
    for _ in range(2):
        s.sink.transaction_finished(
            make_txn(outcome=Outcome.BUDGET_REFUSED, status=402, response_body=b"")
        )
    await eventually(lambda: len(s.stored()) == 3)
    line = s.sink.stop_summary(3)
    await s.sink.stopService()
    assert line.startswith("llmobserve proxy stopped: 1 call, $")
    assert ", 0 unpriced, 2 refused or not forwarded; " in line


@pytest_twisted.ensureDeferred
async def test_per_call_log_lines_are_capped_and_the_rest_summed_up(tmp_path: Path) -> None:
    """Over log_lines_per_second, calls get no line of their own; the next window's
    first batch says how many there were and what they cost."""
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if "calls" in event:
            seen.extend(event["calls"].split("\n"))

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        s = Sink(tmp_path, log_events=True, parse_gather=0.05, log_lines_per_second=2)
        for i in range(5):
            s.sink.transaction_finished(make_txn(started_at=1000.0 + i, path=f"/v1/x{i}"))
        await eventually(lambda: len(s.stored()) == 5)
        await deferLater(reactor, 1.05, lambda: None)  # the next window
        s.sink.transaction_finished(make_txn(started_at=2000.0, path="/v1/late"))
        await eventually(lambda: len(s.stored()) == 6)
        await s.sink.stopService()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))
    assert [line.split()[1] for line in seen[:2]] == [
        "api.openai.com/v1/x0",
        "api.openai.com/v1/x1",
    ]
    assert seen[3] == "... and 3 more calls (cost=0.000375) not logged one by one"
    assert len(seen) == 4


@pytest_twisted.ensureDeferred
async def test_parse_threads_pause_only_while_parsing_keeps_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parse thread pauses for the reactor's next turn between exchanges
    (here: after each) while the backlog is small, and never once the
    backlog says parsing falls behind."""
    from llmobserve.events import pipeline

    yields: list[int] = []
    monkeypatch.setattr(pipeline, "_SLICE", 0.0)
    s = Sink(tmp_path)
    monkeypatch.setattr(s.sink._turns, "pause", lambda: yields.append(1))
    for i in range(5):
        s.sink.transaction_finished(make_txn(started_at=1000.0 + i))
    await eventually(lambda: len(s.stored()) == 5)
    assert len(yields) == 5
    s.sink._yield_backlog = -1  # as if the queue were filling up
    for i in range(5):
        s.sink.transaction_finished(make_txn(started_at=2000.0 + i))
    await eventually(lambda: len(s.stored()) == 10)
    assert len(yields) == 5
    await s.sink.stopService()


@pytest_twisted.ensureDeferred
async def test_parse_threads_pause_once_per_slice_not_per_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parse thread pauses for the reactor's next turn once per slice
    (100 us) of parsing, not after every exchange: each pause costs a
    wake-up at the reactor's next turn and cold caches. Exchanges of 30 us
    of (fake) parsing time: ten in one batch pause twice, after the fourth
    and the eighth."""
    from llmobserve.events import pipeline

    now = [0.0]
    clock = SimpleNamespace(perf_counter=lambda: now[0], time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(pipeline, "time", clock)

    def parse_for_30us(exchange: Any) -> Any:
        now[0] += 0.00003
        return fake_analyse(exchange)

    yields: list[int] = []
    s = Sink(tmp_path, analyse=parse_for_30us, parse_gather=0.05)
    monkeypatch.setattr(s.sink._turns, "pause", lambda: yields.append(1))
    for i in range(10):
        s.sink.transaction_finished(make_txn(started_at=1000.0 + i))
    await eventually(lambda: len(s.stored()) == 10)
    assert len(yields) == 2
    await s.sink.stopService()


def test_embedded_mode_needs_the_store_factory_from_its_builder(tmp_path: Path) -> None:
    """The events package never imports the collector's store itself: without a
    collector and without a C{store_factory}, building the sink is refused."""
    with pytest.raises(ValueError, match="store_factory"):
        make_event_sink(
            reactor,
            collector_url=None,
            db_path=str(tmp_path / "events.sqlite3"),
            spool_dir=str(tmp_path / "spool"),
            analyse=fake_analyse,
        )
    reopened = EventSpool(tmp_path / "spool")  # the refused build let go of its spool
    reopened.close()


@pytest_twisted.ensureDeferred
async def test_an_exchange_after_the_sink_stopped_is_counted_not_raised(tmp_path: Path) -> None:
    """A call ending after the spool closed (the drain deadline makes this a
    last resort) is counted as dropped, with one warning, not a traceback
    per event."""
    from twisted.logger import globalLogPublisher

    s = Sink(tmp_path)
    await eventually(lambda: bool(s.stores))
    await s.sink.stopService()
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, seen.append))
    try:
        for i in range(3):
            s.sink.transaction_finished(make_txn(started_at=5000.0 + i))
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, seen.append))
    assert s.sink.events_dropped_total == 3
    assert not [e for e in seen if e.get("log_failure") is not None]
    assert len([e for e in seen if "calls ending now are lost" in e.get("log_format", "")]) == 1


@pytest_twisted.ensureDeferred
async def test_a_priced_call_settles_its_hold_at_its_events_cost_and_tokens(
    tmp_path: Path,
) -> None:
    """The hold a budgeted call carries is settled on the reactor once its
    event is priced: the budget keeps the event's cost, a tokens-per-minute
    limit the event's input + output tokens (3 + 5), not the bound held."""
    from llmobserve.collector import Budget, RateLimit
    from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, CallScope

    ledger = BudgetLedger(time.time)
    ledger.load([Budget("cap", 1.0)], {})
    ledger.load_limits([RateLimit("tpm", 1000, unit="tokens")])
    scope = CallScope("openai", "gpt-4o")
    hold = ledger.reserve(scope, 0.5, 900)
    assert isinstance(hold, BudgetHold)
    assert not isinstance(ledger.reserve(scope, 0.001, 900), BudgetHold)  # 900 held
    s = Sink(tmp_path)
    s.sink.transaction_finished(make_txn(budget_hold=hold))
    await eventually(lambda: len(s.stored()) == 1)
    await eventually(lambda: ledger.accounts()[0].spent == 125_000)  # $0.000125, in nano-USD
    assert isinstance(ledger.reserve(scope, 0.001, 900), BudgetHold)  # 8 + 900 <= 1000
    await s.sink.stopService()
