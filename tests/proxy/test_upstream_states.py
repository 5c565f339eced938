"""UpstreamConnection's state machine, driven by bytes alone.

Each scenario feeds an L{UpstreamConnection} on a L{StringTransport} the
relay's calls and the upstream's bytes, and names the state expected after
every step (h11's way of testing its state machine).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger

from llmobserve.proxy import _states
from llmobserve.proxy._states import IllegalTransition
from llmobserve.proxy._upstream import (
    UPSTREAM_TRANSITIONS,
    UpstreamConnection,
    UpstreamPool,
    UpstreamState,
)

S = UpstreamState
#: A step: bytes from the upstream, or one of the named calls below.
Step = tuple[bytes | str, UpstreamState]


class Listener:
    """Records what the connection reports."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def upstream_headers(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.seen.append(f"headers {status}")

    def upstream_body(self, data: bytes) -> None:
        self.seen.append(f"body {data.decode()}")

    def upstream_complete(self) -> None:
        self.seen.append("complete")

    def upstream_failed(self, kind: str, message: str) -> None:
        self.seen.append(f"failed {kind}")

    def upstream_writable(self, writable: bool) -> None:
        pass


def connection() -> tuple[UpstreamConnection, UpstreamPool]:
    pool = UpstreamPool(MemoryReactorClock())
    return UpstreamConnection(pool, ("http", "127.0.0.1", 80, "example"), 4096), pool


def run(steps: Sequence[Step]) -> tuple[UpstreamConnection, UpstreamPool, Listener]:
    """Play C{steps}, asserting the state after each."""
    conn, pool = connection()
    listener = Listener()
    assert conn.state is S.CONNECTING
    for i, (step, expected) in enumerate(steps):
        if step == "connect":
            conn.makeConnection(StringTransport())  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        elif step == "start GET":
            conn.start(listener, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", b"GET")
        elif step == "start HEAD":
            conn.start(listener, b"HEAD / HTTP/1.1\r\nHost: example\r\n\r\n", b"HEAD")
        elif step == "request sent":
            conn.request_finished()
        elif step == "lost":
            conn.connectionLost(None)
        elif step == "abort":
            conn.abort()
        else:
            assert isinstance(step, bytes)
            conn.dataReceived(step)
        assert conn.state is expected, f"step {i} ({step!r})"
    return conn, pool, listener


_CONNECTED: list[Step] = [("connect", S.IDLE)]
_STARTED: list[Step] = [*_CONNECTED, ("start GET", S.AWAIT_HEAD), ("request sent", S.AWAIT_HEAD)]

SCENARIOS: dict[str, tuple[list[Step], list[str]]] = {
    "keep-alive exchange, back to the pool, then a second one": (
        [
            *_STARTED,
            (b"HTTP/1.1 100 Continue\r\n\r\n", S.AWAIT_HEAD),
            (b"HTTP/1.1 200 OK\r\nContent-", S.AWAIT_HEAD),
            (b"Length: 5\r\n\r\nhel", S.BODY),
            (b"lo", S.IDLE),
            ("start GET", S.AWAIT_HEAD),
            ("request sent", S.AWAIT_HEAD),
            (b"HTTP/1.1 204 No Content\r\n\r\n", S.IDLE),
        ],
        ["headers 200", "body hel", "body lo", "complete", "headers 204", "complete"],
    ),
    "the connection's one parser reads successive responses of each framing": (
        [
            *_STARTED,
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", S.BODY),
            (b"0\r\n\r\n", S.IDLE),
            ("start GET", S.AWAIT_HEAD),
            ("request sent", S.AWAIT_HEAD),
            (b"HTTP/1.1 204 No Content\r\n\r\n", S.IDLE),
            ("start GET", S.AWAIT_HEAD),
            ("request sent", S.AWAIT_HEAD),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", S.IDLE),
        ],
        [
            *("headers 200", "body abc", "complete"),
            *("headers 204", "complete"),
            *("headers 200", "body ok", "complete"),
        ],
    ),
    "a response framed by the end of the connection": (
        [*_STARTED, (b"HTTP/1.1 200 OK\r\n\r\nabc", S.BODY), ("lost", S.CLOSED)],
        ["headers 200", "body abc", "complete"],
    ),
    "Connection: close ends the connection with the response": (
        [
            *_STARTED,
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", S.CLOSED),
        ],
        ["headers 200", "complete"],
    ),
    "a HEAD response ends at its head and is never reused": (
        [
            *_CONNECTED,
            ("start HEAD", S.AWAIT_HEAD),
            ("request sent", S.AWAIT_HEAD),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", S.CLOSED),
        ],
        ["headers 200", "complete"],
    ),
    "an answer before the whole request body was sent closes": (
        [
            *_CONNECTED,
            ("start GET", S.AWAIT_HEAD),
            (b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", S.CLOSED),
        ],
        ["headers 413", "complete"],
    ),
    "bytes on an idle connection close it": (
        [*_CONNECTED, (b"HTTP/1.1 200 OK\r\n\r\n", S.CLOSED)],
        [],
    ),
    "lost while waiting for the head": (
        [*_STARTED, (b"HTTP/1.1 200", S.AWAIT_HEAD), ("lost", S.CLOSED)],
        ["failed upstream_reset"],
    ),
    "a malformed head fails the exchange": (
        [*_STARTED, (b"NOT HTTP\r\n\r\n", S.CLOSED)],
        ["failed bad_upstream_response"],
    ),
    "lost in the middle of a framed body": (
        [
            *_STARTED,
            (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", S.BODY),
            ("lost", S.CLOSED),
        ],
        ["headers 200", "body ab", "failed upstream_reset"],
    ),
    "aborted by the relay, then the loss arrives": (
        [*_STARTED, ("abort", S.CLOSED), ("lost", S.CLOSED)],
        [],
    ),
    "aborted while idle (the pool's sweep)": (
        [*_CONNECTED, ("abort", S.CLOSED), ("lost", S.CLOSED)],
        [],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_states_after_each_step(name: str) -> None:
    """The state after every byte sequence and relay call is the one named."""
    steps, reported = SCENARIOS[name]
    _, _, listener = run(steps)
    assert listener.seen == reported


def test_only_an_idle_connection_is_pooled() -> None:
    """A connection is offered again only once its exchange settled in IDLE."""
    conn, pool, _ = run([*_STARTED, (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", S.IDLE)])
    assert pool.take_idle(conn.key) is conn
    closed, closed_pool, _ = run(
        [*_STARTED, (b"HTTP/1.1 200 OK\r\n\r\n", S.BODY), ("lost", S.CLOSED)]
    )
    assert closed_pool.take_idle(closed.key) is None


@pytest.fixture
def recorded() -> Iterator[set[tuple[Any, Any]]]:
    seen: set[tuple[Any, Any]] = set()
    UPSTREAM_TRANSITIONS.seen = seen
    yield seen
    UPSTREAM_TRANSITIONS.seen = None


def test_every_transition_is_exercised(recorded: set[tuple[Any, Any]]) -> None:
    """The scenarios above walk every edge of the table, and no other."""
    for steps, _ in SCENARIOS.values():
        run(steps)
    assert recorded == UPSTREAM_TRANSITIONS.edges()


@pytest.mark.parametrize(
    "steps",
    [
        [("start GET", S.AWAIT_HEAD)],  # before the transport is made
        [*_STARTED, ("start GET", S.AWAIT_HEAD)],  # a second exchange at once
        [*_CONNECTED, ("abort", S.CLOSED), ("start GET", S.AWAIT_HEAD)],  # on a closed one
        [*_CONNECTED, ("connect", S.IDLE)],  # made twice
    ],
)
def test_illegal_transitions_raise(steps: list[Step]) -> None:
    """A move the table does not allow raises at once (the tests run strict)."""
    *legal, last = steps
    with pytest.raises(IllegalTransition):
        run([*legal, last])


def test_illegal_transition_is_logged_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without strict mode the illegal move is logged, not raised, and made."""
    events: list[Any] = []
    monkeypatch.setattr(_states, "strict", False)
    monkeypatch.setattr(_states, "_log", Logger(observer=cast(ILogObserver, events.append)))
    conn, _, _ = run([*_STARTED, ("start GET", S.AWAIT_HEAD)])
    assert conn.state is S.AWAIT_HEAD
    assert [e["message"] for e in events] == [
        "UpstreamConnection: illegal transition AWAIT_HEAD -> AWAIT_HEAD"
    ]
