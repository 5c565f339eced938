"""Relay's state machine, driven by bytes alone.

Each scenario feeds the in-memory proxy (StringTransports, a fake clock) the
client's bytes, the upstream's bytes, closes and ticks, and names the state
of the exchange's L{Relay} expected after every step, then the outcome the
transaction records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from support.inmemory import InMemoryProxy, Upstream
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from llmobserve.proxy import _resource
from llmobserve.proxy._relay import CLIENT_CLOSE_GRACE, RELAY_TRANSITIONS, Relay, RelayState
from llmobserve.transaction import Outcome

S = RelayState


def get(target: bytes = b"http://127.0.0.1:8080/v1/chat/completions") -> bytes:
    return (
        b"GET /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nX-LLMObserve-Target-URL: "
        + target
        + b"\r\n\r\n"
    )


HEAD_AND_HALF = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok"
REST = b"ok"
#: A chunked response whose body is all sent before its end of message.
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Happening:
    """What else can happen to an exchange than client bytes."""

    UPSTREAM_LOST = "the upstream connection drops"
    CLIENT_LOST = "the client goes away"
    GRACE_PASSES = "the client-close grace passes"


#: A step: client bytes, upstream bytes as C{("upstream", data)}, or a L{Happening}.
Step = tuple[bytes | str | tuple[str, bytes], RelayState]


class _Recorded(Relay):
    """A Relay that remembers its instances (the state is read from outside)."""

    made: list[Relay] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


@pytest.fixture(autouse=True)
def recorded_relays(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_resource, "Relay", _Recorded)
    _Recorded.made = []
    yield
    _Recorded.made = []


def run(steps: Sequence[Step]) -> tuple[Relay, InMemoryProxy]:
    """Play C{steps} on one client connection, asserting the relay's state after each."""
    proxy = InMemoryProxy(server="lean")
    channel, _ = proxy.client()
    upstreams: list[Upstream] = []
    for i, (step, expected) in enumerate(steps):
        if isinstance(step, tuple):
            if proxy.connects() > len(upstreams):
                upstreams.append(proxy.accept_upstream())
            upstreams[-1].send(step[1])
        elif step == Happening.UPSTREAM_LOST:
            if proxy.connects() > len(upstreams):
                upstreams.append(proxy.accept_upstream())
            upstreams[-1].close()
        elif step == Happening.CLIENT_LOST:
            channel.connectionLost(Failure(ConnectionDone()))
        elif step == Happening.GRACE_PASSES:
            proxy.reactor.advance(CLIENT_CLOSE_GRACE * 2)
        else:
            assert isinstance(step, bytes)
            channel.dataReceived(step)
        (relay,) = _Recorded.made
        assert relay.state is expected, f"step {i} ({step!r})"
    (relay,) = _Recorded.made
    return relay, proxy


SCENARIOS: dict[str, tuple[list[Step], Outcome]] = {
    "a whole exchange": (
        [
            (get(), S.BEFORE_RESPONSE),
            (("upstream", HEAD_AND_HALF), S.RESPONDING),
            (("upstream", REST), S.ENDED),
        ],
        Outcome.OK,
    ),
    "a refused target ends before any response": (
        [(get(b"http://10.1.2.3/v1/chat/completions"), S.ENDED)],
        Outcome.REFUSED,
    ),
    "the upstream drops before its head": (
        [(get(), S.BEFORE_RESPONSE), (Happening.UPSTREAM_LOST, S.ENDED)],
        Outcome.UPSTREAM_RESET,
    ),
    "the upstream drops mid-body": (
        [
            (get(), S.BEFORE_RESPONSE),
            (("upstream", HEAD_AND_HALF), S.RESPONDING),
            (Happening.UPSTREAM_LOST, S.ENDED),
        ],
        Outcome.UPSTREAM_RESET,
    ),
    "the client leaves before the response": (
        [(get(), S.BEFORE_RESPONSE), (Happening.CLIENT_LOST, S.ENDED)],
        Outcome.CLIENT_ABORTED,
    ),
    "the client leaves mid-response, the upstream ends within the grace": (
        [
            (get(), S.BEFORE_RESPONSE),
            (("upstream", CHUNKED), S.RESPONDING),
            (Happening.CLIENT_LOST, S.CLIENT_LEFT),
            (("upstream", LAST_CHUNK), S.ENDED),
        ],
        Outcome.OK,
    ),
    "the client leaves mid-response, the grace runs out": (
        [
            (get(), S.BEFORE_RESPONSE),
            (("upstream", HEAD_AND_HALF), S.RESPONDING),
            (Happening.CLIENT_LOST, S.CLIENT_LEFT),
            (Happening.GRACE_PASSES, S.ENDED),
        ],
        Outcome.CLIENT_ABORTED,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_states_after_each_step(name: str) -> None:
    """The state after every step is the one named; one transaction, its outcome."""
    steps, outcome = SCENARIOS[name]
    _, proxy = run(steps)
    assert [t.outcome for t in proxy.sink.transactions] == [outcome]


@pytest.fixture
def recorded() -> Iterator[set[tuple[Any, Any]]]:
    seen: set[tuple[Any, Any]] = set()
    RELAY_TRANSITIONS.seen = seen
    yield seen
    RELAY_TRANSITIONS.seen = None


def test_every_transition_is_exercised(recorded: set[tuple[Any, Any]]) -> None:
    """The scenarios above walk every edge of the table, and no other."""
    for steps, _ in SCENARIOS.values():
        _Recorded.made = []
        run(steps)
    assert recorded == RELAY_TRANSITIONS.edges()
