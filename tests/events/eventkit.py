"""Helpers for the event-path tests: transactions, a fake parser, a fake collector.

The fake collector is a small Twisted server speaking docs/LINK.md on
127.0.0.1 whose behaviour the test controls: acks on/off, stop reading
(black hole), send garbage. It records every event id it receives and
counts duplicates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory

from llmobserve.events._codec import MAGIC, FrameDecoder, FrameError, encode_frame
from llmobserve.transaction import Context, Outcome, Transaction

CANARIES = (
    "sk-CANARY-auth",
    "CANARY-xapikey",
    "CANARY-apikey",
    "CANARY-goog",
    "CANARY-cookie",
    "CANARY-query",
)


def make_txn(**overrides: Any) -> Transaction:
    """A finished exchange with a secret in every place one can hide."""
    fields: dict[str, Any] = dict(
        started_at=1_700_000_000.25,
        method="POST",
        scheme="https",
        host="api.openai.com",
        port=443,
        path="/v1/chat/completions",
        query="key=CANARY-query&alt=sse",
        request_headers=(
            (b"Authorization", b"Bearer sk-CANARY-auth"),
            (b"x-api-key", b"CANARY-xapikey"),
            (b"Api-Key", b"CANARY-apikey"),
            (b"x-goog-api-key", b"CANARY-goog"),
            (b"Cookie", b"session=CANARY-cookie"),
            (b"Content-Type", b"application/json"),
        ),
        context=Context(
            run_id="run-1", section="s", customer_id="cust-9", properties={"team": "a"}
        ),
        provider_hint=None,
        status=200,
        response_headers=(
            (b"content-type", b"application/json"),
            (b"Set-Cookie", b"x=CANARY-cookie"),
        ),
        request_body=b'{"model":"gpt-4o","messages":[]}',
        request_body_truncated=False,
        response_body=b'{"usage":{"prompt_tokens":3,"completion_tokens":5}}',
        response_body_truncated=False,
        request_bytes=33,
        response_bytes=52,
        ttfb=0.1,
        duration=0.2,
        overhead=0.0001,
        outcome=Outcome.OK,
    )
    fields.update(overrides)
    return Transaction(**fields)


@dataclass(frozen=True)
class FakeUsage:
    """Shaped like parsers.UsageRecord."""

    provider: str = "openai"
    endpoint: str | None = "chat.completions"
    model: str | None = "gpt-4o-2024-08-06"
    streamed: bool = False
    usage: Any = None
    usage_source: str = "reported"
    cost_usd: float | None = 0.000125
    price_ref: str | None = "genai-prices:openai/gpt-4o"
    graphql: Any = None
    parse_error: str | None = None
    flags: tuple[str, ...] = ()


def fake_analyse(exchange: Any) -> FakeUsage:
    """A parser that reads the stand-in exchange like the real one would."""
    assert isinstance(exchange.request_headers, Mapping)
    assert exchange.request_headers.get("content-type") == "application/json"
    return FakeUsage(usage={"input_tokens": 3, "output_tokens": 5})


# -- the fake collector -----------------------------------------------------


class FakeCollectorProtocol(Protocol):
    def __init__(self, server: FakeCollector) -> None:
        self.server = server
        self.decoder = FrameDecoder()
        self.buffer = b""
        self.linked = False

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        if self.server.black_hole:
            self.transport.pauseProducing()  # type: ignore[union-attr]  # connected: transport is set

    def dataReceived(self, data: bytes) -> None:
        self.server.bytes_received += len(data)
        if not self.linked:
            self.buffer += data
            if len(self.buffer) < len(MAGIC):
                return
            if not self.buffer.startswith(MAGIC):
                self.transport.loseConnection()  # type: ignore[union-attr]  # connected: transport is set
                return
            data, self.buffer, self.linked = self.buffer[len(MAGIC) :], b"", True
        try:
            messages = self.decoder.feed(data)
        except FrameError:
            self.server.protocol_errors += 1
            self.transport.loseConnection()  # type: ignore[union-attr]  # connected: transport is set
            return
        for m in messages:
            self.server.handle(self, m)

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(encode_frame(message))  # type: ignore[union-attr]  # connected: transport is set

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.server.connections:
            self.server.connections.remove(self)


class FakeCollector(ServerFactory):
    """Controls: ack, black_hole, garbage_after (batches), on_batch hook."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.seen: set[str] = set()
        self.duplicates = 0
        self.kinds: dict[str, int] = {}
        self.batches: list[dict[str, Any]] = []
        self.hellos: list[dict[str, Any]] = []
        self.connections: list[FakeCollectorProtocol] = []
        self.ack = True
        self.black_hole = False
        self.stall = False  # stop reading right after the welcome
        self.stalled: list[FakeCollectorProtocol] = []
        self.garbage_after: int | None = None
        self.bytes_received = 0
        self.protocol_errors = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> FakeCollectorProtocol:
        return FakeCollectorProtocol(self)

    def handle(self, proto: FakeCollectorProtocol, m: dict[str, Any]) -> None:
        if m["t"] == "hello":
            self.hellos.append(m)
            proto.send({"t": "welcome", "version": 1, "server": "fake"})
            if self.stall:
                proto.transport.pauseProducing()  # type: ignore[union-attr]  # connected: transport is set
                self.stalled.append(proto)
        elif m["t"] == "ping":
            proto.send({"t": "pong", "ts": m.get("ts")})
        elif m["t"] == "batch":
            self.batches.append({"seq": m["seq"], "n": len(m["events"])})
            for e in m["events"]:
                self.kinds[e.get("kind")] = self.kinds.get(e.get("kind"), 0) + 1
                if e["id"] in self.seen:
                    self.duplicates += 1
                else:
                    self.seen.add(e["id"])
                    self.ids.append(e["id"])
            if self.garbage_after is not None and len(self.batches) >= self.garbage_after:
                self.garbage_after = None
                proto.transport.write(b"\x00\x00\x00\x05garbage!!")  # type: ignore[union-attr]  # connected: transport is set
                return
            if self.ack:
                proto.send({"t": "ack", "seq": m["seq"]})
            self._check()

    def _check(self) -> None:
        for n, d in list(self._waiters):
            if len(self.seen) >= n:
                self._waiters.remove((n, d))
                d.callback(None)

    def unstall(self) -> None:
        """Read again, on open links and new ones."""
        self.stall = False
        for proto in self.stalled:
            if proto.transport is not None:
                proto.transport.resumeProducing()  # type: ignore[attr-defined]  # TCP: an IPushProducer too
        self.stalled.clear()

    def when_received(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((n, d))
        self._check()
        return d


# -- waiting on the real reactor ---------------------------------------------


async def eventually(
    predicate: Any, timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> None:
    """Poll C{predicate()} on the running reactor until true, or fail after C{timeout}."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await deferLater(reactor, interval, lambda: None)


class FakeStore:
    """An EventStore stand-in: dedups on id, can fail or block, checks its thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.events: dict[str, dict[str, Any]] = {}
        self.inserts = 0
        self.fail_next = 0
        self.gate = threading.Event()
        self.gate.set()
        self.thread = threading.current_thread()
        self.closed = False

    def insert(self, events: Any) -> int:
        assert threading.current_thread() is self.thread, "store used from two threads"
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk on fire")
        self.inserts += 1
        new = 0
        for e in events:
            if e["id"] not in self.events:
                self.events[e["id"]] = e
                new += 1
        return new

    def close(self) -> None:
        self.closed = True
