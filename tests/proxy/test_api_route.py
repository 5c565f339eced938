"""The proxy's C{/api} route on the lean channel: twisted.web resources
(the collector's events and report) served through C{ChannelRequest}."""

from __future__ import annotations

import json
from typing import Any

from support.inmemory import InMemoryProxy
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource


class Held(Resource):
    """Answers later: keeps each request and what its notifyFinish reports."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web's Resource is unannotated
        self.requests: list[Any] = []
        self.outcomes: list[object] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        request.notifyFinish().addBoth(self.outcomes.append)
        return server.NOT_DONE_YET


def _proxy_with_api() -> tuple[InMemoryProxy, Held]:
    proxy = InMemoryProxy()
    held = Held()
    api = Resource()
    api.putChild(b"held", held)
    proxy.resource._api = lambda: api
    return proxy, held


def _get(proxy: InMemoryProxy, target: str) -> tuple[Any, Any]:
    channel, transport = proxy.client()
    channel.dataReceived(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return channel, transport


def test_query_args_reach_the_resource_and_finishing_fires_notify_finish() -> None:
    proxy, held = _proxy_with_api()
    _channel, transport = _get(proxy, "/api/held?by=provider&since=24h&by=model&empty=")
    (request,) = held.requests
    assert request.args == {b"by": [b"provider", b"model"], b"since": [b"24h"], b"empty": [b""]}
    assert request.prepath == [b"api", b"held"]
    body = json.dumps({"ok": True}).encode()
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()
    assert held.outcomes == [None]
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(body)


def test_a_client_gone_before_the_answer_fails_notify_finish() -> None:
    proxy, held = _proxy_with_api()
    channel, _transport = _get(proxy, "/api/held")
    channel.connectionLost(Failure(ConnectionDone()))
    (outcome,) = held.outcomes
    assert isinstance(outcome, Failure) and outcome.check(ConnectionDone)
    held.requests[0].finish()  # a late answer is dropped quietly


def test_notify_finish_after_the_end_reports_at_once() -> None:
    proxy, held = _proxy_with_api()
    _get(proxy, "/api/held")
    request = held.requests[0]
    request.finish()
    late: list[object] = []
    request.notifyFinish().addBoth(late.append)
    assert late == [None]


def test_without_a_store_api_is_a_json_404() -> None:
    proxy = InMemoryProxy()
    _channel, transport = _get(proxy, "/api/report")
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    assert b"X-LLMObserve-Error: not_found" in transport.value()


def test_api_itself_is_a_json_404_that_names_the_routes() -> None:
    proxy, _held = _proxy_with_api()
    _channel, transport = _get(proxy, "/api")
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    assert b"/api/report" in transport.value()


def _proxy_with_dashboard() -> InMemoryProxy:
    from llmobserve.collector import DashboardResource

    proxy = InMemoryProxy()
    proxy.resource._dashboard = DashboardResource
    return proxy


def test_an_embedded_proxy_serves_the_dashboard_and_redirects_its_root() -> None:
    """With a store of its own, the proxy answers / with a redirect to
    /dashboard, and /dashboard and its files from the package."""
    proxy = _proxy_with_dashboard()
    _, transport = _get(proxy, "/")
    head = transport.value()
    assert head.startswith(b"HTTP/1.1 302 ") and b"\r\nlocation: /dashboard\r\n" in head.lower()
    _, transport = _get(proxy, "/dashboard?since=7d")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200 ") and b"text/html" in answer
    assert b'src="/dashboard/app.js"' in answer
    _, transport = _get(proxy, "/dashboard/chart.js")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and b"StackedBars" in transport.value()
    _, transport = _get(proxy, "/dashboard?since=garbage")
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_a_proxy_without_a_store_has_no_dashboard() -> None:
    """A proxy that sends its events to a collector has no page of its own:
    / and /dashboard are JSON 404s as before (the collector serves it)."""
    proxy = InMemoryProxy()
    for target in ("/", "/dashboard"):
        _, transport = _get(proxy, target)
        assert transport.value().startswith(b"HTTP/1.1 404 ")
