"""ProxyChannel's state machine, driven by bytes alone.

Each scenario feeds a L{ProxyChannel} (the in-memory proxy: StringTransports
and a fake clock) the client's bytes, the upstream's bytes and the clock's
ticks, and names the channel's state expected after every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from support.inmemory import InMemoryProxy, Upstream

from llmobserve.proxy._channel import CHANNEL_TRANSITIONS, ChannelState, ProxyChannel

S = ChannelState
TARGET = b"X-LLMObserve-Target-URL: http://127.0.0.1:8080/v1/chat/completions\r\n"
GET = b"GET /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n" + TARGET + b"\r\n"
GET_CLOSE = (
    b"GET /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nConnection: close\r\n" + TARGET + b"\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Happening:
    """What else can happen to a channel than client bytes."""

    RESPONSE = "upstream answers"
    HALF_RESPONSE = "upstream sends a head and half the body"
    REST = "upstream sends the rest of the body"
    DEADLINES_PASS = "every deadline passes (head, body, keep-alive)"
    LOST = "the client goes away"


#: A step: bytes from the client, or one of L{Happening}'s names.
Step = tuple[bytes | str, ChannelState]


def run(steps: Sequence[Step]) -> tuple[ProxyChannel, Any, list[Upstream], InMemoryProxy]:
    """Play C{steps} on a new client connection, asserting the state after each."""
    proxy = InMemoryProxy(server="lean")
    channel, client = proxy.client()
    assert isinstance(channel, ProxyChannel)
    assert channel.state is S.OPEN
    upstreams: list[Upstream] = []
    for i, (step, expected) in enumerate(steps):
        if step == Happening.RESPONSE:
            if proxy.connects() > len(upstreams):
                upstreams.append(proxy.accept_upstream())
            upstreams[-1].send(OK)
        elif step == Happening.HALF_RESPONSE:
            upstreams.append(proxy.accept_upstream())
            upstreams[-1].send(OK[:-1])
        elif step == Happening.REST:
            upstreams[-1].send(OK[-1:])
        elif step == Happening.DEADLINES_PASS:
            site = proxy.site
            longest = max(site.head_timeout, site.body_timeout, site.keepalive_timeout)
            for _ in range(int(longest * 2) + 4):
                proxy.reactor.advance(0.5)
        elif step == Happening.LOST:
            channel.connectionLost(None)
        else:
            assert isinstance(step, bytes)
            channel.dataReceived(step)
        assert channel.state is expected, f"step {i} ({step!r})"
    return channel, client, upstreams, proxy


SCENARIOS: dict[str, list[Step]] = {
    "keep-alive exchanges leave it open": [
        (GET, S.OPEN),
        (Happening.RESPONSE, S.OPEN),
        (GET, S.OPEN),
        (Happening.RESPONSE, S.OPEN),
    ],
    "a Connection: close request drains, its response closes": [
        (GET_CLOSE, S.DRAINING),
        (Happening.RESPONSE, S.CLOSED),
    ],
    "bytes after a Connection: close request are not parsed": [
        (GET_CLOSE, S.DRAINING),
        (GET, S.DRAINING),
        (Happening.RESPONSE, S.CLOSED),
    ],
    "idle past the keep-alive deadline closes": [
        (GET, S.OPEN),
        (Happening.RESPONSE, S.OPEN),
        (Happening.DEADLINES_PASS, S.CLOSED),
    ],
    "a malformed request is answered and closes": [(b"NOT HTTP AT ALL\r\n\r\n", S.CLOSED)],
    "garbage behind a request being relayed drains": [
        (GET, S.OPEN),
        (b"\x01\x02 garbage\r\n\r\n", S.DRAINING),
        (Happening.RESPONSE, S.CLOSED),
    ],
    "the client leaves while its request is relayed": [(GET, S.OPEN), (Happening.LOST, S.CLOSED)],
    "the client leaves while draining": [(GET_CLOSE, S.DRAINING), (Happening.LOST, S.CLOSED)],
    "a deadline passing mid-response closes; the held request is never begun": [
        (GET + GET, S.OPEN),
        (Happening.HALF_RESPONSE, S.OPEN),
        (Happening.DEADLINES_PASS, S.CLOSED),
        (Happening.REST, S.CLOSED),
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_states_after_each_step(name: str) -> None:
    """The state after every byte sequence, answer and tick is the one named."""
    steps = SCENARIOS[name]
    channel, client, _, _ = run(steps)
    if channel.state is S.CLOSED and steps[-1][0] != Happening.LOST:
        assert client.disconnecting, "the proxy closed the connection"


def test_bytes_after_draining_reach_no_upstream() -> None:
    """A request sent after a Connection: close request is never forwarded."""
    _, client, upstreams, _ = run(
        SCENARIOS["bytes after a Connection: close request are not parsed"]
    )
    (upstream,) = upstreams
    assert upstream.received().count(b"GET /v1/chat/completions") == 1
    assert client.value().count(b"HTTP/1.1 200") == 1


def test_a_closed_channel_begins_no_held_request() -> None:
    """Closed by a deadline while answering, the channel forwards no pipelined
    request once that answer ends (it used to begin the next one)."""
    _, client, upstreams, proxy = run(
        SCENARIOS["a deadline passing mid-response closes; the held request is never begun"]
    )
    assert proxy.connects() == 1, "no connection opened for the held request"
    assert upstreams[0].received().count(b"GET /v1/chat/completions") == 1
    assert client.value().endswith(b"ok")


@pytest.fixture
def recorded() -> Iterator[set[tuple[Any, Any]]]:
    seen: set[tuple[Any, Any]] = set()
    CHANNEL_TRANSITIONS.seen = seen
    yield seen
    CHANNEL_TRANSITIONS.seen = None


def test_every_transition_is_exercised(recorded: set[tuple[Any, Any]]) -> None:
    """The scenarios above walk every edge of the table, and no other."""
    for steps in SCENARIOS.values():
        run(steps)
    assert recorded == CHANNEL_TRANSITIONS.edges()
