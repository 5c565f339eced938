"""The proxy's client-key gate in memory: verdict cache on a Clock, and a
call's body held while its key is checked."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from llmobserve.proxy._keygate import VERDICT_TTL, AwaitingKey, ClientKeyGate, ClientVerdict

GOOD = ClientVerdict(None, "shop", "ingest")


class Lookups:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answer: Deferred[ClientVerdict] | None = None

    def __call__(self, key: str) -> Deferred[ClientVerdict]:
        self.asked.append(key)
        return self.answer if self.answer is not None else succeed(GOOD)


def test_the_hot_path_is_a_cached_verdict_for_two_seconds() -> None:
    clock, lookups = Clock(), Lookups()
    gate = ClientKeyGate(clock, lookups)
    assert gate.cached(b"k") is None
    gate.check(b"k")
    assert gate.cached(b"k") == GOOD and lookups.asked == ["k"]
    clock.advance(VERDICT_TTL)
    assert gate.cached(b"k") is None
    verdict = gate.cached(None)
    assert verdict is not None and verdict.reason == "missing"


def test_an_unreachable_key_store_keeps_known_keys_and_refuses_others() -> None:
    clock, lookups = Clock(), Lookups()
    gate = ClientKeyGate(clock, lookups)
    gate.check(b"known")
    clock.advance(VERDICT_TTL + 1)
    lookups.answer = fail(RuntimeError("collector unreachable"))
    seen: list[ClientVerdict] = []
    gate.check(b"known").addCallback(seen.append)
    lookups.answer = fail(RuntimeError("collector unreachable"))
    gate.check(b"new").addCallback(seen.append)
    assert seen == [GOOD, ClientVerdict("unavailable")]


def test_scopes() -> None:
    assert GOOD.allows("ingest") and not GOOD.allows("read")
    assert ClientVerdict(None, None, "admin").allows("read")
    assert not ClientVerdict("revoked").allows("ingest")
    assert "revoked" in ClientVerdict("revoked").message("ingest")
    assert GOOD.message("read") == "an ingest key may not do this (needs read or admin)"
    assert ClientVerdict(None, None, "read").message("ingest").startswith("a read key ")


class Relay:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def body_chunk(self, data: bytes) -> None:
        self.seen.append(data)

    def body_complete(self) -> None:
        self.seen.append("complete")

    def client_gone(self) -> None:
        self.seen.append("gone")


class Request:
    class channel:  # pause_client reads request.channel.transport
        transport = None


def test_a_held_body_reaches_the_relay_in_order_once_the_key_is_good() -> None:
    relay = Relay()
    projects: list[str | None] = []

    def start(project: str | None) -> Relay:
        projects.append(project)
        return relay

    waiting = AwaitingKey(Request(), start, lambda v: None)
    waiting.body_chunk(b"a")
    waiting.body_chunk(b"b")
    waiting.body_complete()
    waiting.decided(GOOD)
    waiting.body_chunk(b"late")
    assert relay.seen == [b"a", b"b", "complete", b"late"] and projects == ["shop"]


def test_a_refused_key_starts_nothing_and_drops_the_body() -> None:
    refused: list[ClientVerdict] = []
    waiting = AwaitingKey(Request(), lambda p: Relay(), refused.append)
    waiting.body_chunk(b"a")
    bad = ClientVerdict(None, "x", "read")  # valid, but may not call
    waiting.decided(bad)
    waiting.body_chunk(b"b")
    waiting.body_complete()
    assert refused == [bad]


def test_a_client_gone_before_the_verdict_starts_nothing() -> None:
    started: list[Any] = []
    waiting = AwaitingKey(Request(), started.append, started.append)
    waiting.client_gone()
    waiting.decided(GOOD)
    assert started == []
