"""The collector link in memory: handshake, acks, resend, backoff, heartbeats.

No sockets: a fake endpoint hands out C{StringTransport}s and a C{Clock}
drives time, so each test is synchronous and deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import msgpack
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmobserve.events._codec import MAGIC, FrameDecoder, encode_frame
from llmobserve.events._link import CollectorLink, LinkProtocol, batch_frame, retry_policy
from llmobserve.events._outbox import Outbox
from llmobserve.events._spool import EventSpool


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connection attempts wait until the test says succeed or fail."""

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.times: list[float] = []
        self.clock: Clock | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = Deferred()
        self.attempts.append((protocolFactory, d))
        if self.clock is not None:
            self.times.append(self.clock.seconds())
        return d

    def succeed(self) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport

    def fail(self) -> None:
        self.attempts[-1][1].errback(Failure(ConnectionRefusedError()))


class Peer:
    """Reads what the proxy wrote to a StringTransport, frame by frame."""

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.decoder = FrameDecoder()
        self.magic = False

    def messages(self) -> list[dict[str, Any]]:
        data = self.transport.value()
        self.transport.clear()
        if not self.magic:
            assert data.startswith(MAGIC)
            data, self.magic = data[len(MAGIC) :], True
        return self.decoder.feed(data)


class Rig:
    def __init__(self, tmp_path: Path, *, window: int = 1 << 20, interval: float = 1.0) -> None:
        self.clock = Clock()
        self.spool = EventSpool(tmp_path)
        self.outbox = Outbox(
            lambda a, n, b: succeed(self.spool.read(a, n, b)),
            acked_seq=self.spool.acked_seq,
            last_seq=self.spool.last_seq,
            max_bytes=window,
            on_acked=self.spool.ack,
        )
        self.endpoint = FakeEndpoint()
        self.endpoint.clock = self.clock
        self.link = CollectorLink(
            self.clock,
            self.endpoint,
            self.outbox,
            proxy_id=self.spool.proxy_id,
            url="http://127.0.0.1:1",
            heartbeat_interval=interval,
            retry=retry_policy(initial=0.1, cap=1.0, rng=lambda: 1.0),
        )
        self.link.startService()

    def add(self, n: int, size: int = 50) -> None:
        for _ in range(n):
            i = self.spool.last_seq + 1
            payload = msgpack.packb({"id": f"ev{i}", "kind": "call", "pad": "x" * size})
            seq = self.spool.append(payload)
            assert seq is not None
            self.outbox.offer(seq, payload)
        self.link.pump()

    def connect(self) -> tuple[Any, StringTransport, Peer]:
        proto, transport = self.endpoint.succeed()
        peer = Peer(transport)
        [hello] = peer.messages()
        assert hello == {"t": "hello", "proxy_id": self.spool.proxy_id, "version": 1}
        proto.dataReceived(encode_frame({"t": "welcome", "version": 1, "server": "t"}))
        self.clock.advance(0)
        return proto, transport, peer


def batches(peer: Peer) -> list[dict[str, Any]]:
    return [m for m in peer.messages() if m["t"] == "batch"]


def ids(msgs: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for m in msgs for e in m["events"]]


def test_protocol_provides_push_producer() -> None:
    verifyObject(IProtocol, LinkProtocol.__new__(LinkProtocol))


def test_batch_frame_is_what_encode_frame_would_write() -> None:
    """The hand-built batch frame decodes like any frame, byte for byte."""
    events = [{"id": "a", "n": 1}, {"id": "b", "x": [1.5, None]}]
    records = [(7, msgpack.packb(events[0])), (8, msgpack.packb(events[1]))]
    frame = batch_frame(records)
    assert frame == encode_frame({"t": "batch", "seq": 8, "events": events})
    assert FrameDecoder().feed(frame) == [{"t": "batch", "seq": 8, "events": events}]


def test_handshake_then_batches_then_acks(tmp_path: Path) -> None:
    """Magic + hello first; no batch before welcome; an ack moves the spool's ack point."""
    rig = Rig(tmp_path)
    assert rig.link.state == "connecting"
    proto, transport = rig.endpoint.succeed()
    peer = Peer(transport)
    assert [m["t"] for m in peer.messages()] == ["hello"]
    rig.add(3)
    assert batches(peer) == [] and rig.link.state == "connecting"
    proto.dataReceived(encode_frame({"t": "welcome", "version": 1, "server": "t"}))
    rig.clock.advance(0)
    assert rig.link.state == "connected"
    sent = batches(peer)
    assert [m["seq"] for m in sent] == [3] and ids(sent) == ["ev1", "ev2", "ev3"]
    proto.dataReceived(encode_frame({"t": "ack", "seq": 3}))
    assert rig.spool.acked_seq == 3 and rig.outbox.waiting == 0
    rig.add(2)
    assert [m["seq"] for m in batches(peer)] == [5]


def test_reconnect_resends_everything_unacknowledged(tmp_path: Path) -> None:
    """After a lost link, events after the last ack go again, in order, nothing else."""
    rig = Rig(tmp_path)
    proto, _transport, peer = rig.connect()
    rig.add(2)
    rig.add(3)
    assert [m["seq"] for m in batches(peer)] == [2, 5]
    proto.dataReceived(encode_frame({"t": "ack", "seq": 2}))
    proto.connectionLost(Failure(ConnectionDone()))
    assert rig.link.state == "down"
    rig.add(1)  # while down: spooled, not sent
    rig.clock.advance(1.0)
    assert len(rig.endpoint.attempts) == 2
    _proto2, _transport2, peer2 = rig.connect()
    resent = batches(peer2)
    assert ids(resent) == ["ev3", "ev4", "ev5", "ev6"] and resent[-1]["seq"] == 6
    assert rig.link.reconnects == 1


def test_a_lying_ack_cannot_skip_unsent_events(tmp_path: Path) -> None:
    """An ack beyond what was sent is clamped: unsent events stay unacknowledged."""
    rig = Rig(tmp_path, window=500)
    proto, _transport, _peer = rig.connect()
    rig.add(20)  # more than the window holds
    proto.dataReceived(encode_frame({"t": "ack", "seq": 10_000}))
    assert rig.spool.acked_seq < 20 and rig.outbox.waiting > 0


def test_backoff_is_jittered_and_capped() -> None:
    """Delays grow from the initial one and never exceed the cap (jitter included)."""
    top = retry_policy(initial=0.25, cap=2.0, rng=lambda: 1.0)
    low = retry_policy(initial=0.25, cap=2.0, rng=lambda: 0.0)
    assert [top(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert [low(a) for a in range(1, 4)] == [0.25, 0.5, 1.0]
    real = retry_policy(initial=0.25, cap=2.0)
    assert all(0.0 < real(a) <= 2.0 for a in range(1, 500))


def test_collector_down_retries_at_capped_intervals(tmp_path: Path) -> None:
    """With the collector unreachable, attempts come at growing intervals up to the cap."""
    rig = Rig(tmp_path)
    while len(rig.endpoint.attempts) < 10:
        n = len(rig.endpoint.attempts)
        rig.endpoint.fail()
        assert rig.link.state == "down"
        while len(rig.endpoint.attempts) == n:
            rig.clock.advance(0.01)
    gaps = [
        round(b - a, 1) for a, b in zip(rig.endpoint.times, rig.endpoint.times[1:], strict=False)
    ]
    assert gaps == [0.2, 0.4, 0.8] + [1.0] * 6  # initial 0.1 x 2^n, capped at 1.0
    assert rig.link.reconnects == 9
    rig.add(5)
    assert rig.outbox.waiting == 5  # kept on disk meanwhile


def test_heartbeat_timeout_closes_a_half_open_link(tmp_path: Path) -> None:
    """A collector silent for three heartbeat intervals is dropped (and retried)."""
    rig = Rig(tmp_path, interval=1.0)
    proto, transport, peer = rig.connect()
    rig.clock.advance(1.0)
    assert [m["t"] for m in peer.messages()] == ["ping"]
    proto.dataReceived(encode_frame({"t": "pong", "ts": 1.0}))  # alive
    rig.clock.advance(1.0)
    rig.clock.advance(1.0)
    assert not transport.disconnected  # 2 intervals of silence
    rig.clock.advance(1.0)  # 3 intervals since the pong
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionDone()))
    assert rig.link.state == "down"
    rig.clock.advance(1.0)
    assert len(rig.endpoint.attempts) == 2


def test_ping_from_collector_gets_a_pong(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    proto, _transport, peer = rig.connect()
    proto.dataReceived(encode_frame({"t": "ping", "ts": 5.0}))
    assert peer.messages() == [{"t": "pong", "ts": 5.0}]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05garbage",
        b"\xff\xff\xff\xff",
        encode_frame({"t": "ack", "seq": "nope"}),
        encode_frame({"t": "welcome", "version": 99}),
    ],
)
def test_garbage_from_the_collector_aborts_the_link(tmp_path: Path, garbage: bytes) -> None:
    """Undecodable or nonsensical frames close the link; unacked events stay queued."""
    rig = Rig(tmp_path)
    proto, transport, _peer = rig.connect()
    rig.add(2)
    proto.dataReceived(garbage)
    assert transport.disconnected and rig.link.protocol_errors == 1
    assert rig.outbox.waiting == 2


def test_paused_transport_stops_sending(tmp_path: Path) -> None:
    """A collector that stops reading pauses the producer: nothing more is written."""
    rig = Rig(tmp_path)
    _proto, transport, peer = rig.connect()
    assert transport.producer is not None
    transport.producer.pauseProducing()
    rig.add(5)
    assert batches(peer) == []
    transport.producer.resumeProducing()
    rig.clock.advance(0)
    assert ids(batches(peer)) == [f"ev{i}" for i in range(1, 6)]


def test_window_bounds_memory_and_the_rest_comes_from_disk(tmp_path: Path) -> None:
    """Over the window, events wait on disk only; all are delivered in order."""
    rig = Rig(tmp_path, window=1000)
    rig.link.max_batch_records = 4
    proto, _transport, peer = rig.connect()
    proto.transport.producer.pauseProducing()
    rig.add(100)  # ~60 bytes each: ~16 fit
    assert rig.outbox.memory_bytes <= 1000
    proto.transport.producer.resumeProducing()
    got: list[str] = []
    for _ in range(200):
        rig.clock.advance(0)
        sent = batches(peer)
        if not sent:
            break
        got += ids(sent)
        for m in sent:
            proto.dataReceived(encode_frame({"t": "ack", "seq": m["seq"]}))
        assert rig.outbox.memory_bytes <= 1000
    assert got == [f"ev{i}" for i in range(1, 101)]
    assert rig.outbox.waiting == 0


def test_replay_after_restart_sends_the_backlog(tmp_path: Path) -> None:
    """Events spooled by a previous process are sent after the next welcome."""
    rig = Rig(tmp_path)
    rig.add(7)
    rig.link.stopService()
    rig.spool.close()
    rig2 = Rig(tmp_path)
    assert rig2.outbox.waiting == 7
    _, _, peer = rig2.connect()
    assert ids(batches(peer)) == [f"ev{i}" for i in range(1, 8)]


def test_stop_closes_the_link(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    proto, transport, _peer = rig.connect()
    d = rig.link.stopService()
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert d.called and rig.link.state == "down"


def test_an_outage_is_logged_once_down_once_up_and_a_summary_between(tmp_path: Path) -> None:
    """Issue 14 item 13: no line per retry (ClientService's "Scheduling retry" and the
    factory's "Starting factory" included): one line when the link goes down, one
    summary per summary_interval while it stays down, one when it is back."""
    from twisted.logger import formatEvent, globalLogPublisher

    logged: list[str] = []

    def observer(event: Any) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        rig = Rig(tmp_path)
        rig.link.summary_interval = 60.0
        proto, _transport, _peer = rig.connect()
        rig.add(3)
        proto.connectionLost(Failure(ConnectionDone()))  # the collector goes away
        for _ in range(150):  # about 150 s of retries at the 1 s cap
            n = len(rig.endpoint.attempts)
            for _tick in range(100):
                if len(rig.endpoint.attempts) > n:
                    break
                rig.clock.advance(0.05)
            rig.endpoint.fail()
        rig.clock.advance(2)
        rig.connect()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))
    mine = [line for line in logged if "collector" in line or "retry" in line or "factory" in line]
    assert len(mine) == 5, mine
    assert mine[0] == "collector link up: http://127.0.0.1:1"
    assert mine[1].startswith("collector link down: http://127.0.0.1:1 lost;")
    assert mine[2].startswith("collector link still down: http://127.0.0.1:1 for 1 min")
    assert mine[2].endswith("; 3 events waiting")
    assert mine[3].startswith("collector link still down: http://127.0.0.1:1 for 2 min")
    assert mine[4].startswith("collector link up: http://127.0.0.1:1 (back after 15")
