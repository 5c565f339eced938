"""The collector's link server in memory: StringTransport, Clock, manual commits."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver

from llmobserve._loglimit import LogLimiter
from llmobserve.collector._budget import PartialFrameBudget
from llmobserve.collector._link import LinkRegistry, LinkServerProtocol
from llmobserve.collector._store import EventStore
from llmobserve.collector._writer import BatchWriter
from llmobserve.events._codec import (
    MAX_EVENT_DEPTH,
    FrameDecoder,
    encode_frame,
    nested_deeper_than,
)


class ManualRunner:
    """A writer thread stand-in: jobs run only when the test says so."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.pending: list[tuple[Callable[[EventStore], Any], Deferred[Any]]] = []
        self.fail_next = False

    def submit(self, job: Callable[[EventStore], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((job, d))
        return d

    def run_all(self) -> None:
        while self.pending:
            job, d = self.pending.pop(0)
            if self.fail_next:
                self.fail_next = False
                d.errback(OSError("disk full"))
                continue
            d.callback(job(self.store))


class Link:
    """One in-memory link: protocol, transport, and the frames it sent."""

    def __init__(self, writer: BatchWriter, clock: Clock, registry: LinkRegistry) -> None:
        self.proto = LinkServerProtocol(writer, clock, registry, heartbeat=10.0, max_unacked=50)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._decoder = FrameDecoder()

    def send(self, message: dict[str, Any]) -> None:
        self.proto.dataReceived(encode_frame(message))

    def received(self) -> list[dict[str, Any]]:
        data = self.transport.value()
        self.transport.clear()
        return self._decoder.feed(data)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def hello(self, proxy_id: str) -> None:
        self.send({"t": "hello", "proxy_id": proxy_id, "version": 1})
        assert self.received() == [{"t": "welcome", "version": 1, "server": "llmobserve-collector"}]


def events(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "kind": "call", "ts": 1.0 + i} for i in range(n)]


@pytest.fixture
def env(tmp_path: Path) -> Any:
    store = EventStore(tmp_path / "x.sqlite3")
    runner = ManualRunner(store)
    writer = BatchWriter(runner)
    clock = Clock()
    registry = LinkRegistry()
    yield store, runner, writer, clock, registry
    store.close()


def test_hello_welcome(env: Any) -> None:
    """The collector answers hello with welcome (version 1, its name)."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    assert not link.closed
    assert registry.describe()[0]["proxy_id"] == "p1"


def test_ack_only_after_commit(env: Any) -> None:
    """A batch is acked with its seq only once the store has committed it."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 2, "events": events("a", 3)})
    assert link.received() == []  # not committed yet: no ack
    assert store.count() == 0
    runner.run_all()
    assert store.count() == 3
    assert link.received() == [{"t": "ack", "seq": 2}]
    assert store.acked_seq("p1") == 2


def test_acks_in_order_grouped_commit(env: Any) -> None:
    """Batches queued during a commit share the next one and are acked in order."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 1, "events": events("a", 2)})
    link.send({"t": "batch", "seq": 2, "events": events("b", 2)})
    link.send({"t": "batch", "seq": 3, "events": events("c", 2)})
    assert len(runner.pending) == 1  # one transaction running, two batches queued
    runner.run_all()
    assert writer.commits == 2
    assert link.received() == [{"t": "ack", "seq": s} for s in (1, 2, 3)]
    assert store.count() == 6


def test_resent_batch_deduplicated_and_acked(env: Any) -> None:
    """A batch resent after a reconnect is acked again and stored once."""
    store, runner, writer, clock, registry = env
    first = Link(writer, clock, registry)
    first.hello("p1")
    first.send({"t": "batch", "seq": 5, "events": events("a", 4)})
    runner.run_all()
    first.proto.connectionLost()
    again = Link(writer, clock, registry)
    again.hello("p1")
    again.send({"t": "batch", "seq": 5, "events": events("a", 4)})
    runner.run_all()
    assert again.received() == [{"t": "ack", "seq": 5}]
    assert store.count() == 4
    assert writer.duplicates == 4


def test_two_proxies_separate_seq_spaces(env: Any) -> None:
    """Two proxies using the same seq numbers each get their own acks."""
    store, runner, writer, clock, registry = env
    a = Link(writer, clock, registry)
    b = Link(writer, clock, registry)
    a.hello("proxy-a")
    b.hello("proxy-b")
    a.send({"t": "batch", "seq": 0, "events": events("a", 2)})
    b.send({"t": "batch", "seq": 0, "events": events("b", 3)})
    b.send({"t": "batch", "seq": 1, "events": events("bb", 1)})
    a.send({"t": "batch", "seq": 1, "events": events("aa", 1)})
    runner.run_all()
    assert a.received() == [{"t": "ack", "seq": 0}, {"t": "ack", "seq": 1}]
    assert b.received() == [{"t": "ack", "seq": 0}, {"t": "ack", "seq": 1}]
    assert store.links() == {"proxy-a": 1, "proxy-b": 1}
    assert store.count() == 7


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x03\xc1\xc1\xc1",  # undecodable body
        struct.pack(">I", 16 * 1024 * 1024 + 1),  # oversized length
        b"\x00\x00\x00\x01\x90",  # a list, not a map
        encode_frame({"t": "batch", "seq": 1, "events": []}),  # batch before hello
    ],
)
def test_garbage_closes_only_that_link(env: Any, garbage: bytes) -> None:
    """A protocol error closes the offending link; another link carries on."""
    _store, runner, writer, clock, registry = env
    good = Link(writer, clock, registry)
    good.hello("good")
    bad = Link(writer, clock, registry)
    bad.proto.dataReceived(garbage)
    assert bad.closed
    assert registry.protocol_errors == 1
    bad.proto.connectionLost()
    good.send({"t": "batch", "seq": 1, "events": events("g", 2)})
    runner.run_all()
    assert good.received() == [{"t": "ack", "seq": 1}]
    assert not good.closed


@pytest.mark.parametrize(
    "message",
    [
        {"t": "hello", "proxy_id": "p", "version": 2},
        {"t": "hello", "proxy_id": "", "version": 1},
        {"t": "hello", "proxy_id": 7, "version": 1},
        {"t": "hello", "proxy_id": "p", "version": True},
    ],
)
def test_bad_hello_closes(env: Any, message: dict[str, Any]) -> None:
    """A hello with a bad version or proxy id is refused by closing."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.send(message)
    assert link.closed
    assert link.received() == []


@pytest.mark.parametrize(
    "message",
    [
        {"t": "batch", "seq": "1", "events": []},
        {"t": "batch", "seq": -1, "events": []},
        {"t": "batch", "seq": True, "events": []},
        {"t": "batch", "seq": 1, "events": {"id": "x"}},
        {"t": "batch", "seq": 1},
        {"t": "hello", "proxy_id": "again", "version": 1},
    ],
)
def test_bad_batch_closes(env: Any, message: dict[str, Any]) -> None:
    """A malformed batch (or a second hello) after hello closes the link."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send(message)
    assert link.closed
    runner.run_all()
    assert store.count() == 0


def test_non_map_events_dropped_rest_acked(env: Any) -> None:
    """Events that are not maps are dropped (with a log); the rest is stored."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 1, "events": [*events("a", 2), "junk", 5]})
    runner.run_all()
    assert link.received() == [{"t": "ack", "seq": 1}]
    assert store.count() == 2


def test_frames_split_anywhere(env: Any) -> None:
    """Hello and batch delivered one byte at a time still work."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    data = encode_frame({"t": "hello", "proxy_id": "p", "version": 1}) + encode_frame(
        {"t": "batch", "seq": 9, "events": events("x", 3)}
    )
    for i in range(len(data)):
        link.proto.dataReceived(data[i : i + 1])
    runner.run_all()
    assert [m["t"] for m in link.received()] == ["welcome", "ack"]
    assert store.count() == 3


def test_ping_answered_with_pong(env: Any) -> None:
    """A ping gets a pong echoing its ts."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "ping", "ts": 12.5})
    assert link.received() == [{"t": "pong", "ts": 12.5}]


def test_unknown_message_ignored(env: Any) -> None:
    """A message kind this collector does not know is ignored, not fatal."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "future-thing", "x": 1})
    assert not link.closed


def test_no_hello_times_out(env: Any) -> None:
    """A link that sends the magic but never hello is closed after a heartbeat."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    clock.advance(9.9)
    assert not link.closed
    clock.advance(0.2)
    assert link.closed


def test_silent_link_closed_after_three_heartbeats(env: Any) -> None:
    """A half-open link (silent for 3 heartbeats) is closed; pings go out meanwhile."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    clock.advance(10)
    assert [m["t"] for m in link.received()] == ["ping"]
    clock.advance(10)
    assert not link.closed
    clock.advance(10)
    assert link.closed
    assert registry.links == set()


def test_traffic_keeps_link_open(env: Any) -> None:
    """A link that keeps sending (pongs) is never closed as silent."""
    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    for _ in range(10):
        clock.advance(10)
        link.send({"t": "pong", "ts": 0.0})
    assert not link.closed


def test_backpressure_pauses_and_resumes(env: Any) -> None:
    """Over max_unacked events in flight the link stops reading until commits."""
    _, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 1, "events": events("a", 30)})
    assert link.transport.producerState == "producing"
    link.send({"t": "batch", "seq": 2, "events": events("b", 30)})
    assert link.transport.producerState == "paused"
    runner.run_all()
    assert link.transport.producerState == "producing"


def test_commit_failure_closes_without_ack(env: Any) -> None:
    """If the store cannot commit, no ack is sent and the link is closed."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 1, "events": events("a", 2)})
    runner.fail_next = True
    runner.run_all()
    assert link.received() == []
    assert link.closed
    assert store.count() == 0


def test_ack_after_disconnect_not_written(env: Any) -> None:
    """A commit that completes after the link dropped writes nothing."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    link.send({"t": "batch", "seq": 1, "events": events("a", 2)})
    link.proto.connectionLost()
    runner.run_all()
    assert link.received() == []
    assert store.count() == 2


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200), prefix_hello=st.booleans())
def test_random_bytes_never_raise(env: Any, data: bytes, prefix_hello: bool) -> None:
    """Whatever bytes arrive, dataReceived never raises: the link works or closes."""
    _, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    if prefix_hello:
        link.hello("fuzz")
    link.proto.dataReceived(data)
    runner.run_all()
    clock.advance(100)
    assert link.closed


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    event=st.dictionaries(
        st.sampled_from(["id", "ts", "status", "usage", "context", "cost_usd", "model", "x"]),
        _values,
    )
)
def test_any_event_map_is_stored(env: Any, event: dict[str, Any]) -> None:
    """Any map of msgpack values is stored (never rejected) and acked."""
    store, runner, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("fuzz")
    link.send({"t": "batch", "seq": 1, "events": [event]})
    runner.run_all()
    assert link.received() == [{"t": "ack", "seq": 1}]
    assert store.count() >= 1


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_poisoned_event_is_acked_and_innocent_batch_stored(env: Any) -> None:
    """An event nested 800 levels deep, committed in one transaction with an
    innocent proxy's batch, is stored as a rejected record and both links
    get their acks and stay open (the shared commit used to roll back and
    both links were reset)."""
    store, runner, writer, clock, registry = env
    innocent = Link(writer, clock, registry)
    innocent.hello("innocent")
    poisoned = Link(writer, clock, registry)
    poisoned.hello("poisoned")
    innocent.send({"t": "batch", "seq": 1, "events": events("warm", 1)})
    # these two queue behind the first commit and go into one transaction
    innocent.send({"t": "batch", "seq": 2, "events": events("i", 5)})
    bad = {"id": "deep", "kind": "call", "ts": 2.0, "context": {"x": _deep(800)}}
    poisoned.send({"t": "batch", "seq": 7, "events": [*events("p", 2), bad]})
    runner.run_all()
    assert writer.commits == 2
    assert innocent.received() == [{"t": "ack", "seq": 1}, {"t": "ack", "seq": 2}]
    assert poisoned.received() == [{"t": "ack", "seq": 7}]
    assert not innocent.closed and not poisoned.closed
    assert store.count() == 9 and writer.rejected == 1
    (rejected,) = store.events(kind="rejected")
    assert rejected["id"] == "deep" and "deeper than 64" in rejected["reason"]


def _partial(length: int, have: int) -> bytes:
    """The first C{have} bytes of a frame whose body is C{length} bytes."""
    return struct.pack(">I", length) + b"\x00" * have


def test_partial_frames_of_all_links_share_one_cap(tmp_path: Path) -> None:
    """Bytes held for incomplete frames count against one cap over all links:
    the link whose bytes would pass it is closed, its bytes released, and
    the others (and new frames once memory is free) carry on."""
    store = EventStore(tmp_path / "x.sqlite3")
    runner = ManualRunner(store)
    writer = BatchWriter(runner)
    clock = Clock()
    registry = LinkRegistry(PartialFrameBudget(max_total=1000, max_pre_hello=100))
    a, b, c = (Link(writer, clock, registry) for _ in range(3))
    for i, link in enumerate((a, b, c)):
        link.hello(f"p{i}")
    a.proto.dataReceived(_partial(5000, 400))
    b.proto.dataReceived(_partial(5000, 400))
    assert registry.budget.held == 800
    c.proto.dataReceived(_partial(5000, 400))
    assert c.closed and not a.closed and not b.closed
    assert registry.budget.held == 800 and registry.budget.refusals == 1
    # a link that grows past the cap is the one refused
    a.proto.dataReceived(b"\x00" * 300)
    assert a.closed and registry.budget.held == 400
    b.proto.connectionLost(None)
    assert registry.budget.held == 0
    d = Link(writer, clock, registry)
    d.hello("p3")
    d.send({"t": "batch", "seq": 1, "events": events("d", 3)})
    runner.run_all()
    assert d.received() == [{"t": "ack", "seq": 1}] and registry.budget.held == 0
    store.close()


def test_bytes_before_hello_are_capped_per_link(env: Any) -> None:
    """Before hello a link may hold only a few KiB of an incomplete frame; the
    hello deadline is not the only bound any more."""
    _, _, writer, clock, _ = env
    registry = LinkRegistry(PartialFrameBudget(max_total=10**9, max_pre_hello=1024))
    link = Link(writer, clock, registry)
    link.proto.dataReceived(_partial(1 << 20, 1000))
    assert not link.closed
    link.proto.dataReceived(b"\x00" * 100)
    assert link.closed and registry.budget.held == 0 and registry.budget.refusals == 1
    # after hello the per-link cap no longer applies
    greeted = Link(writer, clock, registry)
    greeted.hello("p")
    greeted.proto.dataReceived(_partial(1 << 20, 100_000))
    assert not greeted.closed and registry.budget.held == 100_000


def test_repeated_protocol_errors_log_a_few_lines_then_a_count(env: Any) -> None:
    """A peer that makes the same error over and over gets a few log lines per
    minute and one line counting the rest, not one line each."""
    from twisted.logger import LogLevel, globalLogPublisher

    _, _, writer, clock, _ = env
    registry = LinkRegistry(limiter=LogLimiter(clock, burst=3, window=60.0))
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, seen.append))
    try:
        for _ in range(1000):
            link = Link(writer, clock, registry)
            link.proto.dataReceived(b"\x00\x00\x00\x01\xc1")
            assert link.closed
        clock.advance(61)
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, seen.append))
    warnings = [e for e in seen if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 4
    assert warnings[-1]["n"] == 997 and "more like this" in warnings[-1]["log_format"]
    assert registry.protocol_errors == 1000


def test_nesting_depth_is_measured_without_recursion() -> None:
    """The depth check walks iteratively: 100,000 levels do not overflow it."""
    assert nested_deeper_than(_deep(100_000), MAX_EVENT_DEPTH)
    assert not nested_deeper_than({"a": {"b": [1, (2,)]}}, 4)
    assert nested_deeper_than({"a": {"b": [1, (2,)]}}, 3)
    assert not nested_deeper_than("scalar", 0)


def test_health_shows_the_peer_as_host_port(env: Any) -> None:
    """Issue 14 item 14: /health's links show C{host:port}, not C{IPv4Address(...)}."""
    from twisted.internet.address import IPv6Address

    from llmobserve.collector._link import host_port

    _, _, writer, clock, registry = env
    link = Link(writer, clock, registry)
    link.hello("p1")
    assert registry.describe()[0]["peer"] == "192.168.1.1:54321"  # StringTransport's peer
    assert host_port(IPv6Address("TCP", "::1", 8000)) == "[::1]:8000"
