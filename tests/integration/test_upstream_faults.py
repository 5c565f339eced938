"""Real-process tests of hostile or failing upstreams (RELIABILITY T07, T14, T21, T22)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.clients import RawClient, RawResponse, StreamReader, proxy_request, raw_request
from support.proxy import ProxyProcess, RSSSampler
from support.upstreams import (
    Close,
    FullBacklogListener,
    RawScriptUpstream,
    ReadRequest,
    Reset,
    Response,
    ScriptStep,
    Send,
    SendRepeated,
    SSEUpstream,
    Stall,
    json_response,
)

FAST_TIMEOUTS = (
    "--allow-cidr",
    "127.0.0.1/32",
    "--connect-timeout",
    "1",
    "--header-timeout",
    "1",
    "--idle-timeout",
    "1",
)

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n' % i


@pytest.fixture(scope="module")
def _fast_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(FAST_TIMEOUTS, workdir=tmp_path_factory.mktemp("fast-proxy")).start()
    try:
        yield proc
    finally:
        proc.terminate(5.0)


@pytest.fixture
def fast_proxy(_fast_proxy: ProxyProcess) -> Iterator[ProxyProcess]:
    """A shared proxy with 1 s connect/header/idle timeouts; checked healthy after each test."""
    assert _fast_proxy.running, "proxy died:\n" + _fast_proxy.log_tail()
    yield _fast_proxy
    assert _fast_proxy.running, "proxy died:\n" + _fast_proxy.log_tail()
    started = time.monotonic()
    health = raw_request(
        _fast_proxy.port,
        f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{_fast_proxy.port}\r\n\r\n".encode(),
        timeout=5,
    )
    assert health.status == 200
    assert time.monotonic() - started < 0.5, "proxy slow to answer /health after the test"


def _error_kind(resp: RawResponse) -> str:
    kind = resp.header("x-llmobserve-error")
    assert kind, f"no X-LLMObserve-Error in {resp.status} {resp.headers!r}"
    assert json.loads(resp.body)["error"]["type"] == kind.decode()
    return kind.decode()


def _post(proxy: ProxyProcess, url: str, body: bytes = b'{"model":"m"}') -> RawResponse:
    data = proxy_request(proxy.port, "POST", url, [("Content-Type", "application/json")], body)
    return raw_request(proxy.port, data, method="POST", timeout=15)


# -- T21: stalls and resets ---------------------------------------------------------


@pytest.mark.timeout(15)
def test_connect_never_completes(fast_proxy: ProxyProcess) -> None:
    """T21 (a): an upstream whose backlog is full: 502/504 at about the connect timeout."""
    with FullBacklogListener() as listener:
        started = time.monotonic()
        resp = _post(fast_proxy, listener.url + "/v1/chat/completions")
        took = time.monotonic() - started
    assert resp.status in (502, 504), resp.body
    _error_kind(resp)
    assert 0.7 < took < 4.0, f"answered after {took:.2f}s with a 1 s connect timeout"


@pytest.mark.timeout(15)
def test_no_response_headers_is_504(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """
    T21 (b): an upstream that takes the request and never answers gives 504
    at about the header timeout, and the proxy closes that upstream connection.
    """
    raw_upstream.script = [ReadRequest(), Stall(10)]
    _assert_504_at_the_header_deadline(fast_proxy, raw_upstream)


def _assert_504_at_the_header_deadline(proxy: ProxyProcess, upstream: RawScriptUpstream) -> None:
    """A call through C{proxy} (1 s header timeout) to C{upstream}, whose script
    never completes a response head: a 504 at about 1 s, the upstream
    connection closed."""
    started = time.monotonic()
    resp = _post(proxy, upstream.url + "/v1/chat/completions")
    took = time.monotonic() - started
    assert resp.status == 504, resp.body
    _error_kind(resp)
    assert 0.7 < took < 4.0, f"answered after {took:.2f}s with a 1 s header timeout"
    assert upstream.connections[0].closed.wait(3), "upstream connection left open"


@pytest.mark.timeout(15)
def test_stream_stall_ends_without_clean_terminator(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """
    T21 (c): headers and 2 events, then silence: the client gets both
    events, then the stream is cut at about the idle timeout *without* a
    clean terminating chunk (no claim of success).
    """
    raw_upstream.script = [
        ReadRequest(),
        Send(SSE_HEAD + _chunk(_event(0)) + _chunk(_event(1))),
        Stall(10),
    ]
    request = proxy_request(
        fast_proxy.port, "POST", raw_upstream.url + "/v1/chat/completions", [], b"{}"
    )
    with StreamReader(fast_proxy.port, request, timeout=8) as s:
        assert s.read_head() == 200
        assert s.read_until(lambda b: b.count(b"\n\n") >= 2)
        got_events_at = time.monotonic()
        s.read_all(timeout=8)
    ended_after = time.monotonic() - got_events_at
    assert bytes(s.body) == _event(0) + _event(1)
    assert not s.complete, "a stalled stream was ended as if it had succeeded"
    assert s.closed
    assert 0.5 < ended_after < 4.0, f"stream cut {ended_after:.2f}s after the last event"


@pytest.mark.timeout(15)
def test_upstream_reset_mid_stream_is_abnormal_end(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """T21 (d): 10 events then RST: the client gets them and an abnormal end, no clean end."""
    events = b"".join(_chunk(_event(i)) for i in range(10))
    raw_upstream.script = [ReadRequest(), Send(SSE_HEAD + events), Reset()]
    request = proxy_request(
        fast_proxy.port, "POST", raw_upstream.url + "/v1/chat/completions", [], b"{}"
    )
    with StreamReader(fast_proxy.port, request, timeout=8) as s:
        assert s.read_head() == 200
        s.read_all(timeout=8)
    assert bytes(s.body) == b"".join(_event(i) for i in range(10))
    assert not s.complete, "an upstream reset was relayed as a clean end"


# -- T22: never two POSTs ----------------------------------------------------------


def _posts_with(upstream: RawScriptUpstream, body: bytes) -> int:
    return sum(1 for r in upstream.requests if r.method == b"POST" and r.body == body)


@pytest.mark.timeout(15)
def test_post_taken_then_close_is_502_once(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """T22 (a): the upstream reads the whole POST and closes without answering: 502, one POST."""
    raw_upstream.script = [ReadRequest(), Close()]
    body = b'{"model":"m","n":"a"}'
    resp = _post(fast_proxy, raw_upstream.url + "/v1/chat/completions", body)
    assert resp.status == 502, resp.body
    _error_kind(resp)
    time.sleep(0.3)
    assert _posts_with(raw_upstream, body) == 1


@pytest.mark.timeout(15)
def test_post_on_reused_connection_never_replayed(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """
    T22 (b): a pooled keep-alive connection dies after the next POST was
    written to it (the upstream read it, then closed): the proxy answers
    502 and never sends that POST again on a new connection.
    """
    ok = Response(200, [("Content-Type", "application/json")], b'{"ok":true}')
    first_conn: list[ScriptStep] = [
        ReadRequest(),
        Send(b"".join(ok.serialize())),
        ReadRequest(),
        Close(),
    ]
    later: list[ScriptStep] = [ReadRequest(), Send(b"".join(ok.serialize()))]
    raw_upstream.scripts = [first_conn]
    raw_upstream.script = later
    url = raw_upstream.url + "/v1/chat/completions"
    assert _post(fast_proxy, url, b'{"n":1}').status == 200
    second = b'{"n":2}'
    resp = _post(fast_proxy, url, second)
    time.sleep(0.3)
    assert _posts_with(raw_upstream, second) == 1, [
        (r.connection, r.body) for r in raw_upstream.requests
    ]
    assert resp.status == 502, resp.body


@pytest.mark.timeout(15)
def test_upstream_503_passed_through_once(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """T22 (c): an upstream 503 reaches the client as is; the POST was sent once."""
    unavailable = json_response({"error": {"message": "overloaded"}}, status=503)
    raw_upstream.script = [ReadRequest(), Send(b"".join(unavailable.serialize()))]
    body = b'{"model":"m","n":"c"}'
    resp = _post(fast_proxy, raw_upstream.url + "/v1/chat/completions", body)
    assert resp.status == 503
    assert resp.json() == {"error": {"message": "overloaded"}}
    assert resp.header("x-llmobserve-error") is None
    time.sleep(0.3)
    assert _posts_with(raw_upstream, body) == 1


# -- T14: slow reader ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_slow_reader_pauses_upstream(
    fast_proxy: ProxyProcess, upstream_factory: Callable[..., Any]
) -> None:
    """
    T14: an SSE upstream pushing ~50 MB at full speed to a client that
    stops reading (small receive buffer) sees its writes blocked within 2 s
    (backpressure reaches it), and the proxy's RSS grows by less than 32 MiB.
    """
    upstream: SSEUpstream = upstream_factory(SSEUpstream, events=50_000, interval=0.0, padding=1000)
    request = proxy_request(
        fast_proxy.port, "POST", upstream.url + "/v1/chat/completions", [], b"{}"
    )
    with (
        RSSSampler(fast_proxy) as rss,
        StreamReader(fast_proxy.port, request, rcvbuf=4096, keep_body=False, timeout=10) as s,
    ):
        assert s.read_head() == 200
        started = time.monotonic()
        blocked = upstream.wait_for(
            lambda: bool(upstream.connections) and upstream.connections[0].writes_blocked > 0,
            timeout=5,
        )
        took = time.monotonic() - started
        time.sleep(1.0)  # hold still: memory must stay bounded while paused
    assert blocked, "the upstream never felt backpressure"
    assert took < 2.0, f"upstream writes blocked only after {took:.2f}s"
    assert rss.growth_kib < 32 * 1024, f"RSS grew {rss.growth_kib} KiB while the client stalled"


@pytest.mark.timeout(15)
def test_client_keeps_connection_after_upstream_error(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """After a proxy-made 502, the same client connection still carries a good request."""
    raw_upstream.script = [ReadRequest(), Close()]
    with RawClient(fast_proxy.port, timeout=10) as client:
        url = raw_upstream.url + "/v1/x"
        client.send(proxy_request(fast_proxy.port, "POST", url, [], b"{}"))
        first = client.read_response(method="POST")
        assert first.status == 502
        if (first.header("connection") or b"").lower() == b"close":
            pytest.skip("proxy closes the client connection after an upstream error (allowed)")
        raw_upstream.script = [ReadRequest(), Send(b"".join(json_response({"ok": 1}).serialize()))]
        client.send(proxy_request(fast_proxy.port, "POST", url, [], b"{}"))
        assert client.read_response(method="POST").status == 200


# -- T07: response header bombs ---------------------------------------------------------

_HEADER_LINE = b"X-Bomb: " + b"a" * 90 + b"\r\n"  # 100 bytes


@pytest.mark.timeout(20)
def test_response_header_bomb_is_cut_at_the_head_cap(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """
    T07: a status line, then 100-byte header lines at full speed, without
    end: a 502 once the head passes its 64 KiB cap, the upstream connection
    closed, proxy RSS up by less than 32 MiB (and /health fast afterwards,
    checked by the fixture).
    """
    raw_upstream.script = [
        ReadRequest(),
        Send(b"HTTP/1.1 200 OK\r\n"),
        SendRepeated(_HEADER_LINE, max_seconds=10),
    ]
    with RSSSampler(fast_proxy) as rss:
        started = time.monotonic()
        resp = _post(fast_proxy, raw_upstream.url + "/v1/chat/completions")
        took = time.monotonic() - started
    assert resp.status == 502, resp.body
    _error_kind(resp)
    assert took < 2.0, f"answered after {took:.2f}s"
    assert raw_upstream.connections[0].closed.wait(3), "upstream connection left open"
    assert rss.growth_kib < 32 * 1024, f"RSS grew {rss.growth_kib} KiB"


@pytest.mark.timeout(20)
def test_response_header_trickle_meets_the_header_deadline(
    fast_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """
    T07, the slow variant (the spec's line a second, scaled with the 1 s
    header deadline here to a line every 0.25 s, so that bytes keep coming
    well within it): the head never completes and the trickle does not
    extend the deadline: a 504 at about the deadline.
    """
    raw_upstream.script = [
        ReadRequest(),
        Send(b"HTTP/1.1 200 OK\r\n"),
        SendRepeated(_HEADER_LINE, interval=0.25, max_seconds=10),
    ]
    _assert_504_at_the_header_deadline(fast_proxy, raw_upstream)
