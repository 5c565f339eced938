"""The relay, in memory: routing, forwarding rules, backpressure and endings.

Every test drives a real server channel and a real upstream protocol over
StringTransports with a fake clock (tests/support/inmemory.py), once with
the lean llhttp channel that C{twistd llmobserve} serves and once with
twisted.web's C{ProxySite} (the resource mounted in a Site).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import h11
import pytest
from support.inmemory import InMemoryProxy
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.python.failure import Failure

from llmobserve.proxy._config import RelayConfig
from llmobserve.transaction import Outcome

ProxyMaker = Callable[..., InMemoryProxy]


@pytest.fixture(params=["lean", "twisted-web"])
def make_proxy(request: pytest.FixtureRequest) -> ProxyMaker:
    """Build in-memory proxies served by one of the two server front ends."""

    def make(**kw: Any) -> InMemoryProxy:
        return InMemoryProxy(server=request.param, **kw)

    return make


TARGET = b"X-LLMObserve-Target-URL: http://127.0.0.1:8080/v1/chat/completions\r\n"


def request(
    method: bytes = b"GET",
    path: bytes = b"/proxy",
    headers: bytes = TARGET,
    body: bytes = b"",
) -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
        + headers
        + length
        + b"\r\n"
        + body
    )


def upstream_requests(data: bytes) -> list[h11.Request]:
    """Parse what the upstream received with h11, as an independent oracle."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    found = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Request):
            found.append(event)
        if isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.SEND_RESPONSE:
                break
    return found


def response_of(data: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes, bool]:
    """Parse what the client received: (response, body, complete)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    head = None
    body = b""
    complete = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            break
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            complete = True
            break
    assert head is not None, data
    return head, body, complete


def test_get_is_forwarded_with_one_host_via_and_no_headers_of_ours(make_proxy: ProxyMaker) -> None:
    """Exactly one Host (the target's), Via added, our and hop-by-hop headers gone."""
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(
        request(
            headers=TARGET
            + b"X_LLMObserve_Customer_ID: c1\r\nAuthorization: Bearer sk-test\r\n"
            + b"Connection: X-Foo\r\nX-Foo: 1\r\n"
        )
    )
    upstream = proxy.accept_upstream()
    (req,) = upstream_requests(upstream.received())
    headers = [(n.lower(), v) for n, v in req.headers]
    assert req.target == b"/v1/chat/completions"
    assert [v for n, v in headers if n == b"host"] == [b"127.0.0.1:8080"]
    assert (b"authorization", b"Bearer sk-test") in headers
    assert (b"via", b"1.1 llmobserve") in headers
    assert not [n for n, _ in headers if b"llmobserve" in n or n == b"x-foo"]


def test_response_is_relayed_and_connection_pooled(make_proxy: ProxyMaker) -> None:
    """The body arrives unchanged; the upstream connection is reused for the next call."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\nhello")
    head, body, complete = response_of(client.value())
    assert (head.status_code, body, complete) == (200, b"hello", True)
    assert (b"x-request-id", b"r1") in head.headers
    assert proxy.pool.idle_count() == 1

    channel.dataReceived(request())
    assert proxy.connects() == 1, "the pooled connection is reused"
    assert upstream.received().count(b"GET /v1/chat/completions HTTP/1.1\r\n") == 2


def test_idle_pooled_connections_close_after_the_pool_idle_timeout(
    make_proxy: ProxyMaker,
) -> None:
    """An unused keep-alive connection is closed within 1-1.25 idle timeouts; one in use is not."""
    proxy = make_proxy(config=RelayConfig(pool_idle_timeout=8))
    channel, _client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy.reactor.advance(6)
    channel.dataReceived(request())  # reused: its idle time starts again
    assert proxy.connects() == 1
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    for _ in range(3):
        proxy.reactor.advance(2)
    assert proxy.pool.idle_count() == 1 and not upstream.transport.disconnecting
    for _ in range(3):
        proxy.reactor.advance(2)
    assert proxy.pool.idle_count() == 0
    assert upstream.transport.disconnecting


def test_transaction_is_recorded_once_with_sizes_and_context(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    body = b'{"model": "gpt-4o-mini"}'
    channel.dataReceived(
        request(b"POST", headers=TARGET + b"X-LLMObserve-Customer-ID: acme\r\n", body=body)
    )
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    (txn,) = proxy.sink.transactions
    assert txn.outcome is Outcome.OK
    assert (txn.method, txn.host, txn.port, txn.path) == (
        "POST",
        "127.0.0.1",
        8080,
        "/v1/chat/completions",
    )
    assert txn.request_body == body and txn.request_bytes == len(body)
    assert txn.response_body == b"{}" and txn.response_bytes == 2
    assert txn.context.customer_id == "acme"
    assert txn.status == 200
    assert txn.ttfb is not None and txn.duration >= txn.ttfb
    assert all(b"llmobserve" not in n.lower() for n, _ in txn.request_headers)


def test_request_body_streams_before_it_is_complete(make_proxy: ProxyMaker) -> None:
    """The upstream sees the head and the first bytes while the client still sends."""
    proxy = make_proxy()
    channel, _client = proxy.client()
    head = request(b"POST", headers=TARGET + b"Content-Length: 10\r\n")
    channel.dataReceived(head + b"01234")
    upstream = proxy.accept_upstream()
    assert upstream.received().endswith(b"\r\n\r\n01234")
    channel.dataReceived(b"56789")
    assert upstream.received().endswith(b"0123456789")
    (req,) = upstream_requests(upstream.received())
    assert (b"content-length", b"10") in [(n.lower(), v) for n, v in req.headers]


def test_chunked_request_body_is_rechunked_upstream(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(
        request(b"POST", headers=TARGET + b"Transfer-Encoding: chunked\r\n")
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    upstream = proxy.accept_upstream()
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(upstream.received())
    events = []
    while (event := conn.next_event()) is not h11.NEED_DATA:
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"abcde"
    assert isinstance(events[-1], h11.EndOfMessage)


def test_slow_client_pauses_the_upstream_read(make_proxy: ProxyMaker) -> None:
    """Response backpressure: the client's full send buffer pauses the upstream socket."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.producer is not None
    client.producer.pauseProducing()  # what the client's socket does when its buffer fills
    assert upstream.transport.producerState == "paused"
    client.producer.resumeProducing()
    assert upstream.transport.producerState == "producing"


def test_slow_upstream_pauses_the_client_read(make_proxy: ProxyMaker) -> None:
    """Request backpressure: the upstream's full send buffer pauses reading the client."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(b"POST", headers=TARGET + b"Content-Length: 100\r\n") + b"x")
    upstream = proxy.accept_upstream()
    assert upstream.transport.producer is not None
    upstream.transport.producer.pauseProducing()
    assert client.producerState == "paused"
    upstream.transport.producer.resumeProducing()
    assert client.producerState == "producing"


def test_sse_chunks_are_written_through_as_they_arrive(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for i in range(3):
        event = b'data: {"a":%d}\n\n' % i
        upstream.send(b"%x\r\n%s\r\n" % (len(event), event))
        assert client.value().endswith(event + b"\r\n"), "written through at once"


def test_client_disconnect_aborts_the_upstream_and_records_client_aborted(
    make_proxy: ProxyMaker,
) -> None:
    """Mid-response, the upstream is cut at its next body byte: the client missed it."""
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    upstream.send(b"5\r\nworld\r\n")
    assert upstream.transport.disconnecting or upstream.transport.disconnected
    assert proxy.pool.idle_count() == 0
    (txn,) = proxy.sink.transactions
    assert txn.outcome is Outcome.CLIENT_ABORTED
    assert txn.response_body == b"hello"
    assert txn.response_bytes == 5


def test_client_disconnect_with_a_silent_upstream_aborts_after_the_grace(
    make_proxy: ProxyMaker,
) -> None:
    """No end of message within the grace: C{client_aborted}, upstream cut."""
    from llmobserve.proxy._relay import CLIENT_CLOSE_GRACE

    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert proxy.sink.transactions == []
    proxy.reactor.advance(CLIENT_CLOSE_GRACE)
    assert upstream.transport.disconnecting or upstream.transport.disconnected
    (txn,) = proxy.sink.transactions
    assert (txn.outcome, txn.error) == (Outcome.CLIENT_ABORTED, "client_disconnected")


def test_a_client_that_read_the_whole_stream_and_closed_is_ok(make_proxy: ProxyMaker) -> None:
    """Issue 14, item 11: the client read the last event and closed; its close is
    seen before the upstream's terminating chunk. Nothing was missed: C{ok}, with the
    full sizes, and the upstream connection goes back to the pool."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    last = b"data: [DONE]\n\n"
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream.send(b"%x\r\n%s\r\n" % (len(last), last))
    assert client.value().endswith(last + b"\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    upstream.send(b"0\r\n\r\n")
    (txn,) = proxy.sink.transactions
    assert (txn.outcome, txn.error) == (Outcome.OK, None)
    assert txn.response_bytes == len(last)
    assert proxy.pool.idle_count() == 1
    assert not upstream.transport.disconnecting


def test_client_disconnect_before_connect_cancels_it(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(request())
    channel.connectionLost(Failure(ConnectionDone()))
    (txn,) = proxy.sink.transactions
    assert txn.outcome is Outcome.CLIENT_ABORTED
    connector = proxy.reactor.connectors[0]
    assert connector.stoppedConnecting


def test_upstream_reset_after_headers_drops_the_client_without_a_final_chunk(
    make_proxy: ProxyMaker,
) -> None:
    """A truncated body must never look complete."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    upstream.close()
    assert not client.value().endswith(b"0\r\n\r\n")
    assert client.disconnecting
    (txn,) = proxy.sink.transactions
    assert txn.outcome is Outcome.UPSTREAM_RESET


def test_upstream_reset_before_headers_is_a_502(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(b"POST", body=b"{}"))
    upstream = proxy.accept_upstream()
    upstream.close()
    head, body, _ = response_of(client.value())
    assert head.status_code == 502
    assert (b"x-llmobserve-error", b"upstream_reset") in head.headers
    assert json.loads(body)["error"]["type"] == "upstream_reset"
    assert proxy.connects() == 1, "a POST is never sent twice"


def test_upstream_refused_is_a_502_and_connect_timeout_a_504(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    proxy.fail_upstream(ConnectionRefusedError())
    head, _, _ = response_of(client.value())
    assert head.status_code == 502
    assert (b"x-llmobserve-error", b"upstream_unreachable") in head.headers

    channel, client = proxy.client()
    channel.dataReceived(request())
    proxy.fail_upstream(TimeoutError())
    head, _, _ = response_of(client.value())
    assert head.status_code == 504


def test_no_response_headers_in_time_is_a_504(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(header_timeout=5))
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    proxy.reactor.advance(4.9)
    assert client.value() == b""
    proxy.reactor.advance(0.5)  # deadlines are swept four times a second
    head, _, _ = response_of(client.value())
    assert head.status_code == 504
    assert (b"x-llmobserve-error", b"upstream_timeout") in head.headers
    assert upstream.transport.disconnecting or upstream.transport.disconnected
    assert proxy.sink.transactions[0].outcome is Outcome.TIMEOUT


def test_a_stalled_stream_is_cut_at_the_idle_timeout(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(idle_timeout=3))
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):  # activity keeps it alive
        proxy.reactor.advance(2)
        upstream.send(b"1\r\nx\r\n")
    assert not client.disconnecting
    proxy.reactor.advance(3.5)  # deadlines are swept four times a second
    assert client.disconnecting
    assert not client.value().endswith(b"0\r\n\r\n")
    assert proxy.sink.transactions[0].outcome is Outcome.TIMEOUT


def test_body_over_the_limit_is_a_413_before_any_connect(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(max_body=10))
    channel, client = proxy.client()
    channel.dataReceived(request(b"POST", body=b"x" * 11))
    proxy.reactor.advance(0)
    head, _, _ = response_of(client.value())
    assert head.status_code == 413
    assert proxy.connects() == 0


def test_chunked_body_over_the_limit_is_a_413(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(max_body=10))
    channel, client = proxy.client()
    channel.dataReceived(request(b"POST", headers=TARGET + b"Transfer-Encoding: chunked\r\n"))
    upstream = proxy.accept_upstream()
    channel.dataReceived(b"8\r\n12345678\r\n8\r\n12345678\r\n")
    proxy.reactor.advance(0)
    head, _, _ = response_of(client.value())
    assert head.status_code == 413
    assert upstream.transport.disconnecting or upstream.transport.disconnected


@pytest.mark.parametrize(
    ("target", "status", "kind"),
    [
        (b"http://169.254.169.254/latest/meta-data/", 403, b"not_allowed"),
        (b"http://10.0.0.1/", 403, b"not_allowed"),
        (b"http://2130706433/", 400, b"bad_target"),
        (b"http://user@api.openai.com/", 400, b"bad_target"),
        (b"ftp://api.openai.com/", 400, b"bad_target"),
    ],
)
def test_refused_targets_get_the_error_contract_and_no_connect(
    make_proxy: ProxyMaker, target: bytes, status: int, kind: bytes
) -> None:
    proxy = make_proxy(allow_cidrs=())
    channel, client = proxy.client()
    channel.dataReceived(request(headers=b"X-LLMObserve-Target-URL: " + target + b"\r\n"))
    proxy.reactor.advance(0)
    head, body, _ = response_of(client.value())
    assert head.status_code == status
    assert (b"x-llmobserve-error", kind) in head.headers
    assert json.loads(body)["error"]["type"] == kind.decode()
    assert proxy.connects() == 0


def test_a_refused_target_is_recorded_as_refused(make_proxy: ProxyMaker) -> None:
    """The proxy's own policy refusal is its own outcome, C{refused}, not a proxy
    error or an upstream's error status (issue 14, item 12): nothing went upstream."""
    proxy = make_proxy(allow_cidrs=())
    channel, _client = proxy.client()
    target = b"http://10.0.0.1/v1/chat/completions"
    channel.dataReceived(request(headers=b"X-LLMObserve-Target-URL: " + target + b"\r\n"))
    proxy.reactor.advance(0)
    (txn,) = proxy.sink.transactions
    assert txn.outcome is Outcome.REFUSED
    assert txn.response_headers == () and txn.ttfb is None


def test_a_streamed_body_over_the_limit_is_recorded_as_refused(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(max_body=10))
    channel, _client = proxy.client()
    channel.dataReceived(request(b"POST", headers=TARGET + b"Transfer-Encoding: chunked\r\n"))
    proxy.accept_upstream()
    channel.dataReceived(b"8\r\n12345678\r\n8\r\n12345678\r\n")
    proxy.reactor.advance(0)
    (txn,) = proxy.sink.transactions
    assert (txn.outcome, txn.status, txn.error) == (Outcome.REFUSED, 413, "body_too_large")


def test_an_unreachable_upstream_is_a_proxy_error(make_proxy: ProxyMaker) -> None:
    """The proxy could not forward (502): C{proxy_error}, not C{refused}."""
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(request())
    proxy.fail_upstream(ConnectionRefusedError())
    (txn,) = proxy.sink.transactions
    assert (txn.outcome, txn.status) == (Outcome.PROXY_ERROR, 502)


def test_missing_target_header_is_a_400(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(headers=b""))
    proxy.reactor.advance(0)
    head, _, _ = response_of(client.value())
    assert head.status_code == 400


def test_foreign_host_header_is_refused(make_proxy: ProxyMaker) -> None:
    """Browser DNS rebinding: a Host that is not ours gets 403."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(b"GET /proxy HTTP/1.1\r\nHost: evil.example:9000\r\n" + TARGET + b"\r\n")
    proxy.reactor.advance(0)
    head, _, _ = response_of(client.value())
    assert head.status_code == 403
    assert (b"x-llmobserve-error", b"host_not_allowed") in head.headers
    assert proxy.connects() == 0


def test_via_loop_is_a_508(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(headers=TARGET + b"Via: 1.1 llmobserve\r\n"))
    proxy.reactor.advance(0)
    head, _, _ = response_of(client.value())
    assert head.status_code == 508


def test_unknown_route_is_a_404_and_health_is_ours(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(path=b"/nope/x", headers=b""))
    head, _, _ = response_of(client.value())
    assert head.status_code == 404

    channel, client = proxy.client()
    channel.dataReceived(request(path=b"/health", headers=b""))
    head, body, _ = response_of(client.value())
    health = json.loads(body)
    assert head.status_code == 200
    assert health["service"] == "llmobserve-proxy"
    assert health["status"] == "ok"
    assert "collector" in health and "events_waiting" in health


def test_base_url_mode_maps_the_provider_prefix(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(base_urls={"openai": "http://127.0.0.1:8081"})
    channel, _client = proxy.client()
    channel.dataReceived(request(path=b"/openai/v1/models?limit=2", headers=b""))
    upstream = proxy.accept_upstream()
    (req,) = upstream_requests(upstream.received())
    assert upstream.port == 8081
    assert req.target == b"/v1/models?limit=2"
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert proxy.sink.transactions[0].provider_hint == "openai"


def test_query_on_proxy_is_merged_into_the_target(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    channel.dataReceived(
        request(
            path=b"/proxy?b=2&c=3",
            headers=b"X-LLMObserve-Target-URL: http://127.0.0.1:8080/q?a=1\r\n",
        )
    )
    upstream = proxy.accept_upstream()
    (req,) = upstream_requests(upstream.received())
    assert req.target == b"/q?a=1&b=2&c=3"


def test_redirects_are_passed_back_not_followed(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(
        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"
    )
    head, _, _ = response_of(client.value())
    assert head.status_code == 302
    assert (b"location", b"http://169.254.169.254/") in head.headers
    assert proxy.connects() == 1


def test_upstream_error_status_passes_through(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    error = b'{"error": {"message": "Rate limit", "type": "requests"}}'
    upstream.send(
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 2\r\n\r\n%s" % (len(error), error)
    )
    head, body, _ = response_of(client.value())
    assert (head.status_code, head.reason, body) == (429, b"Too Many Requests", error)
    assert (b"retry-after", b"2") in head.headers
    assert not [n for n, _ in head.headers if n == b"x-llmobserve-error"]
    assert proxy.sink.transactions[0].outcome is Outcome.UPSTREAM_ERROR


def test_head_response_has_no_body_and_connection_is_not_reused(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request(b"HEAD"))
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    head, body, complete = response_of(client.value(), b"HEAD")
    assert (head.status_code, body, complete) == (200, b"", True)
    assert (b"content-length", b"1000") in head.headers
    assert proxy.pool.idle_count() == 0


def test_stray_bytes_after_a_response_poison_the_connection(make_proxy: ProxyMaker) -> None:
    """204 followed by body bytes: the connection is dropped, never reused."""
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n0123456789")
    head, body, _ = response_of(client.value())
    assert (head.status_code, body) == (204, b"")
    assert proxy.pool.idle_count() == 0
    channel.dataReceived(request())
    assert proxy.connects() == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_broken_upstream_framing_is_a_502(make_proxy: ProxyMaker, bad: bytes) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(bad)
    head, _, _ = response_of(client.value())
    assert head.status_code == 502
    assert (b"x-llmobserve-error", b"bad_upstream_response") in head.headers
    assert upstream.transport.disconnecting or upstream.transport.disconnected


def test_response_header_bomb_is_cut(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy(config=RelayConfig(max_response_head=4096))
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\n")
    for i in range(100):
        upstream.send(b"X-%d: %s\r\n" % (i, b"a" * 90))
    head, _, _ = response_of(client.value())
    assert head.status_code == 502


def test_interim_100_response_is_not_relayed(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head, body, _ = response_of(client.value())
    assert (head.status_code, body) == (200, b"ok")


def test_expect_is_answered_locally_never_forwarded(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(
        request(b"POST", headers=TARGET + b"Expect: 100-continue\r\nContent-Length: 2\r\n")
    )
    assert client.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    channel.dataReceived(b"{}")
    upstream = proxy.accept_upstream()
    (req,) = upstream_requests(upstream.received())
    assert not [n for n, _ in req.headers if n.lower() == b"expect"]


def test_stale_pooled_connection_retries_an_idempotent_get_once(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    channel.dataReceived(request())
    upstream.close()  # the keep-alive connection died under the second request
    retry = proxy.accept_upstream()
    retry.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.value().endswith(b"ok")


def test_stale_pooled_connection_never_resends_a_post(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    channel.dataReceived(request(b"POST", body=b"{}"))
    upstream.close()
    assert proxy.connects() == 1
    assert b"502 Bad Gateway" in client.value()


def test_spans_are_handed_to_the_sink(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    spans = json.dumps([{"span_id": "s1", "name": "agent"}]).encode()
    channel.dataReceived(request(b"POST", path=b"/spans", headers=b"", body=spans))
    head, _body, _ = response_of(client.value())
    assert head.status_code == 202
    assert proxy.sink.spans == [{"span_id": "s1", "name": "agent"}]


def test_a_client_that_stops_reading_is_dropped_at_the_write_timeout(
    make_proxy: ProxyMaker,
) -> None:
    """A reader that never drains its socket frees both connections after the deadline."""
    proxy = make_proxy(config=RelayConfig(client_write_timeout=5, idle_timeout=300))
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.producer is not None
    client.producer.pauseProducing()  # the client's socket buffer is full
    proxy.reactor.advance(4)
    assert not client.disconnecting
    proxy.reactor.advance(1.5)  # deadlines are swept four times a second
    assert client.disconnecting
    assert upstream.transport.disconnecting or upstream.transport.disconnected
    (txn,) = proxy.sink.transactions
    assert (txn.outcome, txn.error) == (Outcome.TIMEOUT, "client_write_timeout")


def test_a_paused_client_does_not_trip_the_upstream_idle_timeout(make_proxy: ProxyMaker) -> None:
    """While we hold the upstream back for a slow reader, its silence is ours, not its."""
    proxy = make_proxy(config=RelayConfig(client_write_timeout=60, idle_timeout=3))
    channel, client = proxy.client()
    channel.dataReceived(request())
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.producer is not None
    client.producer.pauseProducing()
    proxy.reactor.advance(10)
    client.producer.resumeProducing()
    assert not client.disconnecting
    upstream.send(b"0\r\n\r\n")
    assert proxy.sink.transactions[0].outcome is Outcome.OK


def test_a_finished_exchange_leaves_no_reference_cycle() -> None:
    """Relay and request are freed by reference counting when the response ends:
    the cyclic collector's pauses stay off the hot path (lean front end)."""
    import gc

    proxy = InMemoryProxy(server="lean")
    channel, _client = proxy.client()
    channel.dataReceived(request(b"POST", body=b'{"model": "m"}'))
    upstream = proxy.accept_upstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            channel.dataReceived(request(b"POST", body=b'{"model": "m"}'))
            upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        gc.collect()
        cyclic = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(proxy.sink.transactions) == 21
    assert not cyclic & {"Relay", "ChannelRequest", "RequestHead", "BodyTap"}, cyclic
