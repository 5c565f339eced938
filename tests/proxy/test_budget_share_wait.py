"""A call refused only by this process's share of a shared budget waits for
the grant exchange its refusal asked for, then is checked once more.

In memory (the real front end, resource, relay and pool over fakes): what
the relay does while the call waits, when the grant comes, when it does not,
and when the client leaves meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

from support.inmemory import InMemoryProxy
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from llmobserve.collector import Budget
from llmobserve.proxy._budgets import BudgetLedger
from llmobserve.proxy._streamusage import StreamUsagePolicy

UPSTREAM = "127.0.0.1:8080"
TARGET = b"X-LLMObserve-Target-URL: http://127.0.0.1:8080/v1/chat/completions\r\n"


class _Shared:
    """A proxy with one shared $1/day budget, of which it holds no grant yet,
    and a C{next_grants} that the test fires by hand."""

    def __init__(self, *, inject: bool = False) -> None:
        self.proxy = InMemoryProxy(provider_hosts={UPSTREAM: "openai"})
        if inject:
            policy = StreamUsagePolicy(provider_hosts={UPSTREAM: "openai"})
            self.proxy.services.stream_usage = policy
        self.ledger = BudgetLedger(self.proxy.reactor.seconds, shared=True)
        self.ledger.load([Budget("cap", 1.0, "day")], {})
        self.waiters: list[Deferred[None]] = []
        self.ledger.next_grants = self._next
        self.proxy.services.budgets = self.ledger

    def _next(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def grant(self, nano_usd: int) -> None:
        """The exchange ends with this grant, and the waiters hear of it."""
        ((window, _, _),) = self.ledger.grant_snapshot().values()
        self.ledger.set_grants({"cap": (window, nano_usd)})
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def send(self, body: dict[str, Any], *, chunked: bool = False) -> tuple[Any, StringTransport]:
        channel, transport = self.proxy.client()
        data = json.dumps(body).encode()
        head = b"POST /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n" + TARGET
        head += b"Content-Type: application/json\r\n"
        if chunked:
            channel.dataReceived(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(data), 65536):
                part = data[i : i + 65536]
                channel.dataReceived(b"%x\r\n%s\r\n" % (len(part), part))
            channel.dataReceived(b"0\r\n\r\n")
        else:
            channel.dataReceived(head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
        self.proxy.reactor.advance(0)
        return channel, transport


CHAT = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def test_the_call_waits_unconnected_and_goes_once_the_grant_has_room() -> None:
    shared = _Shared()
    _, transport = shared.send(CHAT)
    assert len(shared.waiters) == 1
    assert shared.proxy.connects() == 0 and transport.value() == b""
    shared.grant(250_000_000)  # $0.25
    assert shared.proxy.connects() == 1
    assert shared.ledger.grant_snapshot()["cap"][2] > 0  # held while it is in flight
    upstream = shared.proxy.accept_upstream()
    upstream.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    (txn,) = shared.proxy.sink.transactions
    assert txn.budget_hold is not None and "budget_waited" in txn.budget_hold.flags


def test_the_call_is_refused_when_the_exchange_brings_no_room() -> None:
    shared = _Shared()
    _, transport = shared.send(CHAT)
    shared.grant(0)
    assert shared.proxy.connects() == 0
    assert transport.value().startswith(b"HTTP/1.1 402 ")
    assert b"this process's share" in transport.value()


def test_a_timed_out_wait_is_checked_once_more_then_refused() -> None:
    shared = _Shared()
    _, transport = shared.send(CHAT)
    (waiter,) = shared.waiters
    waiter.errback(TimeoutError("no exchange in time"))
    assert transport.value().startswith(b"HTTP/1.1 402 ")
    assert shared.proxy.connects() == 0


def test_a_client_that_leaves_while_its_call_waits_is_never_forwarded() -> None:
    shared = _Shared()
    channel, _ = shared.send(CHAT)
    (waiter,) = shared.waiters
    channel.connectionLost(None)
    shared.proxy.reactor.advance(60)
    assert waiter.called  # cancelled with the relay
    shared.grant(250_000_000)
    assert shared.proxy.connects() == 0
    assert [t.outcome for t in shared.proxy.sink.transactions] == ["client_aborted"]


def test_a_call_with_no_price_does_not_wait_for_a_grant() -> None:
    """A grant cannot price a call: a body too big to bound (a chunked 1.1 MB
    one, with --stream-usage inject holding it) is refused at once, and never
    connected (the reviewer's case: it used to go upstream unreserved while
    the wait went on, then a second time once the grant came)."""
    shared = _Shared(inject=True)
    body = dict(CHAT, stream=True, messages=[{"role": "user", "content": "x" * 1_100_000}])
    _, transport = shared.send(body, chunked=True)
    assert shared.waiters == []
    assert transport.value().startswith(b"HTTP/1.1 402 ")
    assert shared.proxy.connects() == 0
