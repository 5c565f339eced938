"""The relay's C{--stream-usage inject} hook, in memory, with both front ends:
the body is held until complete (nothing connects before), rewritten with
its new length (or re-chunked), and the usage event is taken out of the
response however the upstream splits it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import h11
import pytest
from support.inmemory import InMemoryProxy
from support.upstreams import openai_sse_events

ProxyMaker = Callable[..., InMemoryProxy]
BASE = {"openai": "http://127.0.0.1:8081"}
BODY = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": []}).encode()
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.fixture(params=["lean", "twisted-web"])
def make_proxy(request: pytest.FixtureRequest) -> ProxyMaker:
    def make(**kw: Any) -> InMemoryProxy:
        return InMemoryProxy(server=request.param, base_urls=BASE, **kw)

    return make


def post(path: bytes, headers: bytes) -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n" + headers + b"\r\n"


def upstream_request(data: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    head, body = None, b""
    while (event := conn.next_event()) is not h11.NEED_DATA:
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert head is not None
    return head, body


def client_body(data: bytes) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    body = b""
    while (event := conn.next_event()) is not h11.NEED_DATA:
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    return body


def test_the_body_is_held_then_sent_with_its_new_length(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    headers = b"Content-Length: %d\r\nAccept-Encoding: gzip\r\n" % len(BODY)
    channel.dataReceived(post(b"/openai/v1/chat/completions", headers) + BODY[:10])
    assert proxy.connects() == 0  # held: nothing goes upstream before the body is whole
    channel.dataReceived(BODY[10:])
    upstream = proxy.accept_upstream()
    req, body = upstream_request(upstream.received())
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    fields = dict((n.lower(), v) for n, v in req.headers)
    assert fields[b"content-length"] == b"%d" % len(body)
    assert fields[b"accept-encoding"] == b"identity"
    assert proxy.sink.transactions == []


def test_a_chunked_body_is_rewritten_and_sent_chunked(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, _client = proxy.client()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (BODY[:7], BODY[7:])) + b"0\r\n\r\n"
    channel.dataReceived(
        post(b"/openai/v1/chat/completions", b"Transfer-Encoding: chunked\r\n") + chunks
    )
    upstream = proxy.accept_upstream()
    req, body = upstream_request(upstream.received())
    assert (b"transfer-encoding", b"chunked") in [(n.lower(), v) for n, v in req.headers]
    assert json.loads(body)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("step", [1, 13, 4096])
def test_the_usage_event_is_removed_from_the_response(make_proxy: ProxyMaker, step: int) -> None:
    """Sent in pieces of C{step} bytes: the client gets the stream without the
    usage event; the parsers' copy keeps it."""
    proxy = make_proxy()
    channel, client = proxy.client()
    headers = b"Content-Length: %d\r\n" % len(BODY)
    channel.dataReceived(post(b"/openai/v1/chat/completions", headers) + BODY)
    upstream = proxy.accept_upstream()
    upstream.send(SSE_HEAD)
    stream = b"".join(openai_sse_events(3, include_usage=True))
    for i in range(0, len(stream), step):
        piece = stream[i : i + step]
        upstream.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    upstream.send(b"0\r\n\r\n")
    assert client_body(client.value()) == b"".join(openai_sse_events(3, include_usage=False))
    [txn] = proxy.sink.transactions
    assert txn.response_body == stream
    assert txn.request_body == BODY  # the client's body, as it sent it


def test_other_requests_are_not_held(make_proxy: ProxyMaker) -> None:
    """Not a completions path, or a provider not in inject mode: streamed as before."""
    proxy = make_proxy()
    channel, _client = proxy.client()
    headers = b"Content-Length: %d\r\n" % len(BODY)
    channel.dataReceived(post(b"/openai/v1/responses", headers) + BODY[:10])
    assert proxy.connects() == 1
    upstream = proxy.accept_upstream()
    assert upstream.received().endswith(b"\r\n\r\n" + BODY[:10])


def test_a_request_that_asked_for_usage_keeps_its_usage_event(make_proxy: ProxyMaker) -> None:
    proxy = make_proxy()
    channel, client = proxy.client()
    asked = json.dumps({"stream": True, "stream_options": {"include_usage": True}}).encode()
    channel.dataReceived(
        post(b"/openai/v1/chat/completions", b"Content-Length: %d\r\n" % len(asked)) + asked
    )
    upstream = proxy.accept_upstream()
    assert upstream_request(upstream.received())[1] == asked
    upstream.send(SSE_HEAD)
    stream = b"".join(openai_sse_events(2, include_usage=True))
    upstream.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(stream), stream))
    assert client_body(client.value()) == stream
