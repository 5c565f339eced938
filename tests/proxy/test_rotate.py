"""Several collectors behind one link: --collector is repeatable, tried in turn."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol

from llmobserve.proxy._rotate import RotatingEndpoint
from llmobserve.proxy._tap import Options, _collector_endpoint


class _Endpoint:
    def __init__(self, name: str, up: bool) -> None:
        self.name = name
        self.up = up
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.up:
            return succeed(self.name)
        return fail(ConnectionRefusedError(self.name))


def _try(endpoint: RotatingEndpoint) -> Any:
    results: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return results[0]


def test_a_failed_attempt_moves_to_the_next_collector() -> None:
    """The first collector while it answers; after a refused attempt the
    next; round robin over all of them."""
    a, b = _Endpoint("a", True), _Endpoint("b", True)
    rotating = RotatingEndpoint([a, b])  # type: ignore[list-item]  # test doubles for endpoints
    assert _try(rotating) == "a"
    assert _try(rotating) == "a"  # a link lost from a live collector retries it
    a.up = False
    assert _try(rotating).check(ConnectionRefusedError)
    assert _try(rotating) == "b"
    b.up = False
    assert _try(rotating).check(ConnectionRefusedError)
    a.up = True
    assert _try(rotating) == "a"
    assert (a.attempts, b.attempts) == (4, 2)


def test_collector_is_repeatable() -> None:
    """--collector twice: both kept, in order; the first is the link's name."""
    options = Options()
    options.parseOptions(
        ["--collector", "http://127.0.0.1:8001", "--collector", "http://127.0.0.1:8002"]
    )
    assert options["collectors"] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert options["collector"] == "http://127.0.0.1:8001"
    assert isinstance(_collector_endpoint(reactor, options), RotatingEndpoint)


def test_one_plain_collector_leaves_the_endpoint_to_the_pipeline() -> None:
    options = Options()
    options.parseOptions(["--collector", "http://127.0.0.1:8001"])
    assert _collector_endpoint(reactor, options) is None
    options = Options()
    options.parseOptions([])
    assert options["collector"] is None and _collector_endpoint(reactor, options) is None


def test_the_url_in_use_follows_the_rotation() -> None:
    """current_url names the collector the next attempt goes to: the first,
    then after a refused attempt the second (what /health reports)."""
    a, b = _Endpoint("a", False), _Endpoint("b", True)
    rotating = RotatingEndpoint(
        [a, b],  # type: ignore[list-item]  # test doubles for endpoints
        ["http://127.0.0.1:8001", "http://127.0.0.1:8002"],
    )
    assert rotating.current_url == "http://127.0.0.1:8001"
    assert _try(rotating).check(ConnectionRefusedError)
    assert rotating.current_url == "http://127.0.0.1:8002"
    assert _try(rotating) == "b"
    assert rotating.current_url == "http://127.0.0.1:8002"
    assert RotatingEndpoint([a]).current_url is None  # type: ignore[list-item]  # a test double
