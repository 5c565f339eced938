"""Real-process tests of HTTP framing at both edges (RELIABILITY T03-T06, T08, T17)."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import pytest
from support.clients import RawClient, build_request, proxy_request, raw_request
from support.proxy import ProxyProcess, RSSSampler
from support.upstreams import (
    BigBodyUpstream,
    MiB,
    RawScriptUpstream,
    ReadRequest,
    RecordingUpstream,
    Response,
    Send,
    WaitClosed,
    generate_body,
)

pytestmark = pytest.mark.timeout(20)

FRESH = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nfresh"


def _head(proxy: ProxyProcess, method: str, url: str, headers: list[tuple[str, str]]) -> bytes:
    return proxy_request(proxy.port, method, url, headers)


# -- T03 ------------------------------------------------------------------------------


def test_expect_100_continue_answered_locally(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """
    T03: a client that sends Expect: 100-continue and waits gets 100 (or a
    final status) within 1 s; the upstream never sees Expect; the same
    client connection then carries a second request.
    """
    url = recording_upstream.url + "/v1/x"
    with RawClient(loopback_proxy.port) as client:
        client.send(
            _head(
                loopback_proxy, "POST", url, [("Expect", "100-continue"), ("Content-Length", "5")]
            )
        )
        early = client.peek(timeout=1.0)
        assert early.startswith(b"HTTP/1.1 "), f"nothing within 1 s after Expect: {early!r}"
        if early.startswith(b"HTTP/1.1 100"):
            client.send(b"hello")
        first = client.read_response(method="POST")
        assert first.status == 200, first.body
        client.send(proxy_request(loopback_proxy.port, "POST", url, [], b"again"))
        second = client.read_response(method="POST")
        assert second.status == 200
    reqs = recording_upstream.wait_requests(2)
    assert all(b"expect" not in r.header_names() for r in reqs), [r.headers for r in reqs]
    assert [r.body for r in reqs] == [b"hello", b"again"]


# -- T04 ------------------------------------------------------------------------------


def test_head_response_has_no_body_and_connection_stays_usable(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """T04: HEAD answered with Content-Length: 1000 gives no body; the next request works."""
    recording_upstream.queue(
        Response(200, [("Content-Length", "1000"), ("Content-Type", "text/plain")], b""),
        Response(200, [("Content-Type", "text/plain")], b"second"),
    )
    url = recording_upstream.url + "/v1/files/f"
    with RawClient(loopback_proxy.port) as client:
        client.send(_head(loopback_proxy, "HEAD", url, []))
        head = client.read_response(method="HEAD")
        assert head.status == 200
        assert head.body == b""
        client.send(_head(loopback_proxy, "GET", url, []))
        after = client.read_response()
    assert (after.status, after.body) == (200, b"second")


@pytest.mark.parametrize("status", [204, 304])
def test_stray_bytes_after_bodiless_response_never_delivered(
    loopback_proxy: ProxyProcess, raw_upstream: RawScriptUpstream, status: int
) -> None:
    """
    T04: a 204/304 followed by 10 stray bytes: the client gets no body, the
    stray bytes are never delivered as the next response, and the upstream
    connection that sent them is not reused (the follow-up goes to a fresh
    connection and gets its own answer).
    """
    stray = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n0123456789" % status
    raw_upstream.scripts = [[ReadRequest(), Send(stray), WaitClosed(10)]]
    raw_upstream.script = [ReadRequest(), Send(FRESH)]
    url = raw_upstream.url + "/v1/x"
    with RawClient(loopback_proxy.port, timeout=8) as client:
        client.send(_head(loopback_proxy, "GET", url, []))
        first = client.read_response()
        assert first.status == status
        assert first.body == b""
        client.send(_head(loopback_proxy, "GET", url, []))
        second = client.read_response()
    assert (second.status, second.body) == (200, b"fresh")
    assert len(raw_upstream.connections[0].requests) == 1


# -- T05 ------------------------------------------------------------------------------


def test_chunked_extensions_and_trailers(
    loopback_proxy: ProxyProcess, raw_upstream: RawScriptUpstream
) -> None:
    """T05: chunk extensions and trailers upstream: the client body is byte-identical, trailers
    never become headers."""
    raw_upstream.script = [
        ReadRequest(),
        Send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b'5;ext=1\r\n{"a":\r\n4;x="y"\r\n 12}\r\n0\r\nX-T: v\r\n\r\n'
        ),
    ]
    resp = raw_request(loopback_proxy.port, _head(loopback_proxy, "GET", raw_upstream.url, []))
    assert resp.status == 200
    assert resp.body == b'{"a": 12}'
    assert resp.header("x-t") is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    ],
    ids=["cl-and-te", "two-cls", "cl-not-a-number"],
)
def test_conflicting_upstream_framing_is_502(
    loopback_proxy: ProxyProcess, raw_upstream: RawScriptUpstream, head: bytes
) -> None:
    """T05 / 2.1 item 8: an upstream response with conflicting framing gives 502, and that
    upstream connection is closed rather than pooled."""
    raw_upstream.script = [ReadRequest(), Send(head), WaitClosed(10)]
    resp = raw_request(loopback_proxy.port, _head(loopback_proxy, "GET", raw_upstream.url, []))
    assert resp.status == 502, (resp.status, resp.body)
    assert resp.header("x-llmobserve-error")
    assert raw_upstream.connections[0].closed.wait(2), "bad upstream connection kept open"


# -- T06 ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["64k-header-block", "501-headers"])
def test_oversized_request_head_refused(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream, shape: str
) -> None:
    """
    T06: a request head over the limit (64 KiB + 1 of request line and
    header lines: the proxy allows more than Twisted's 16 KiB, as Envoy
    does, for SDKs with big headers), or with 501 headers, gets 400/431
    within 1 s, and nothing reaches the upstream.
    """
    if shape == "64k-header-block":
        # Counted without the CRLFs, as Twisted counts, so over any reading.
        base = _head(loopback_proxy, "GET", recording_upstream.url, [("X-Pad", "")])
        counted = len(base) - 2 * base.count(b"\r\n")
        extra = [("X-Pad", "a" * (64 * 1024 + 1 - counted))]
    else:
        extra = [(f"X-H{i}", "v") for i in range(501)]
    data = _head(loopback_proxy, "GET", recording_upstream.url, extra)
    started = time.monotonic()
    with RawClient(loopback_proxy.port, timeout=5) as client:
        client.send(data)
        resp = client.read_response()
    assert resp.status in (400, 431), resp.status
    assert time.monotonic() - started < 1.0
    time.sleep(0.1)
    assert recording_upstream.connection_count == 0


@pytest.mark.timeout(40)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_is_413(
    proxy_factory: Callable[..., ProxyProcess], big_body_upstream: BigBodyUpstream, chunked: bool
) -> None:
    """
    T06: a 200 MB upload against a 32 MiB limit gets 413 before more than
    32 MiB reaches the upstream, and the proxy's RSS grows less than 48 MiB.
    """
    limit = 32 * MiB
    proxy: ProxyProcess = proxy_factory("--allow-cidr", "127.0.0.1/32", "--max-body", str(limit))
    size = 200 * MiB
    framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(size))]
    got_answer = False
    with RSSSampler(proxy) as rss, RawClient(proxy.port, timeout=15) as client:
        client.send(_head(proxy, "PUT", big_body_upstream.url + "/upload", framing))
        try:
            for piece in generate_body(size, 1 << 20):
                client.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                if select.select([client.sock], [], [], 0)[0]:
                    got_answer = True
                    break
        except (BrokenPipeError, ConnectionResetError):
            got_answer = True
        assert got_answer, "the whole 200 MB was accepted"
        resp = client.read_response(method="PUT")
    assert resp.status == 413, (resp.status, resp.body[:200])
    assert resp.header("x-llmobserve-error")
    uploaded = big_body_upstream.uploads[0].bytes if big_body_upstream.uploads else 0
    assert uploaded <= limit, f"{uploaded} bytes reached the upstream"
    assert rss.growth_kib < 48 * 1024


# -- T08 ------------------------------------------------------------------------------

SMUGGLING_VECTORS = {
    "cl-te": b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te-cl": b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "te-xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-space-colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-identity": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-comma-chunked": b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
    "two-te": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "cl-0-and-31": b"Content-Length: 0\r\nContent-Length: 31\r\n\r\n",
    "cl-5-5": b"Content-Length: 5, 5\r\n\r\nhello",
    "cl-plus": b"Content-Length: +5\r\n\r\nhello",
    "cl-hex": b"Content-Length: 0x5\r\n\r\nhello",
    "cl-underscore": b"Content-Length: 1_0\r\n\r\n0123456789",
    "chunk-0x": b"Transfer-Encoding: chunked\r\n\r\n0x3a\r\n" + b"a" * 58 + b"\r\n0\r\n\r\n",
    "chunk-bare-lf": b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
}


@pytest.mark.parametrize("vector", sorted(SMUGGLING_VECTORS))
def test_smuggling_vector_rejected(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream, vector: str
) -> None:
    """
    T08: each framing vector of RELIABILITY 2.1, followed by a pipelined
    request for /smuggled, gives 400 (the connection closes); the upstream
    never sees /smuggled and receives only h11-clean requests.
    """
    host = f"127.0.0.1:{loopback_proxy.port}"
    target = f"X-LLMObserve-Target-URL: {recording_upstream.url}/v1/x\r\n".encode()
    data = (
        b"POST /proxy HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\n"
        + target
        + SMUGGLING_VECTORS[vector]
        + build_request(
            "GET",
            "/proxy",
            [("X-LLMObserve-Target-URL", recording_upstream.url + "/smuggled")],
            host=host,
        )
    )
    with RawClient(loopback_proxy.port, timeout=5) as client:
        client.send(data)
        try:
            resp = client.read_response(method="POST")
        except TimeoutError:
            resp = None
            problem = "no answer within 5 s"
        except ConnectionError:
            resp = None
            problem = "connection closed without an answer"
        time.sleep(0.1)
        smuggled = [r.target for r in recording_upstream.requests if b"/smuggled" in r.target]
        assert not smuggled, f"the pipelined request reached the upstream: {smuggled!r}"
        assert resp is not None, problem
        assert resp.status == 400, (resp.status, resp.body[:200])
        assert client.wait_closed(2), "connection left open after a framing error"
    # At most the one (possibly aborted) request: never a second one.
    assert len(recording_upstream.requests) <= 1, recording_upstream.requests


# -- T17 ------------------------------------------------------------------------------


def test_foreign_host_refused(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """T17: a request whose Host is not the proxy's own (DNS rebinding) gets 421 or 403 and
    nothing goes upstream."""
    data = build_request(
        "GET",
        "/proxy",
        [("X-LLMObserve-Target-URL", recording_upstream.url + "/v1/x")],
        host=f"evil.example:{loopback_proxy.port}",
    )
    resp = raw_request(loopback_proxy.port, data)
    assert resp.status in (403, 421), resp.status
    assert recording_upstream.connection_count == 0


def test_cors_preflight_not_permissive(loopback_proxy: ProxyProcess) -> None:
    """T17: an OPTIONS preflight from a web origin is never answered with a permissive CORS."""
    data = build_request(
        "OPTIONS",
        "/proxy",
        [
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "x-llmobserve-target-url"),
        ],
        host=f"127.0.0.1:{loopback_proxy.port}",
    )
    resp = raw_request(loopback_proxy.port, data, method="OPTIONS")
    assert resp.header("access-control-allow-origin") is None, resp.headers
