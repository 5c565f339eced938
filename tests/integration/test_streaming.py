"""Real-process tests of streaming: SSE pacing, big bodies both ways, client aborts."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest
from support.clients import RawClient, StreamReader, proxy_request, raw_request
from support.proxy import LOOPBACK_ARGS, ProxyProcess, RSSSampler
from support.upstreams import BigBodyUpstream, MiB, SSEUpstream, body_sha256, generate_body

ProxyFactory = Callable[..., ProxyProcess]

BIG = 100 * MiB
RSS_GROWTH_LIMIT_KIB = 30 * 1024


def _sse_request(proxy: ProxyProcess, upstream: SSEUpstream, path: str) -> bytes:
    return proxy_request(
        proxy.port,
        "POST",
        upstream.url + path,
        [("Content-Type", "application/json"), ("Accept", "text/event-stream")],
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
    )


def _arrival_of_each_event(stream: StreamReader, events: list[bytes]) -> list[float]:
    """When the client had received the last byte of each upstream event."""
    times: list[float] = []
    ends = []
    total = 0
    for event in events:
        total += len(event)
        ends.append(total)
    got = 0
    chunks = iter(stream.chunks)
    for end in ends:
        while got < end:
            at, data = next(chunks)
            got += len(data)
        times.append(at)
    return times


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/messages"], ids=["openai", "anthropic"]
)
def test_sse_arrives_chunk_by_chunk(
    loopback_proxy: ProxyProcess, sse_upstream: SSEUpstream, path: str
) -> None:
    """
    SSE events reach the client one by one as the upstream writes them: the
    first event arrives while the upstream is still streaming, and every
    event arrives before the upstream writes the next one (no coalescing,
    no buffering), byte-identical.
    """
    sse_upstream.events = 4
    sse_upstream.interval = 0.15
    with StreamReader(loopback_proxy.port, _sse_request(loopback_proxy, sse_upstream, path)) as s:
        assert s.read_head() == 200
        body = s.read_all(timeout=15)
    assert s.complete, "stream did not end cleanly"
    (stream,) = sse_upstream.streams
    events = sse_upstream.events_for(stream.request)
    assert body == b"".join(events)
    assert (dict((n.lower(), v) for n, v in s.headers).get(b"content-type") or b"").startswith(
        b"text/event-stream"
    )
    arrivals = _arrival_of_each_event(s, events)
    written = stream.event_times
    assert len(written) == len(events)
    assert arrivals[0] < written[-1], "first event only arrived after the stream ended"
    for i in range(len(events) - 1):
        assert arrivals[i] < written[i + 1], f"event {i} held back until event {i + 1} was written"
        assert arrivals[i] - written[i] < 0.1, f"event {i} took {arrivals[i] - written[i]:.3f}s"


def _warm_up(proxy: ProxyProcess, url: str) -> None:
    resp = raw_request(proxy.port, proxy_request(proxy.port, "GET", url), timeout=10)
    assert resp.status == 200, resp.body[:200]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_download_100mb_flat_rss(
    proxy_factory: ProxyFactory, big_body_upstream: BigBodyUpstream, framing: str
) -> None:
    """
    A 100 MB response streams through with the proxy's RSS growing by less
    than 30 MB (sampled every 20 ms during the transfer), byte-identical.
    """
    proxy = proxy_factory(*LOOPBACK_ARGS)
    _warm_up(proxy, big_body_upstream.url + f"/blob?size=100000&framing={framing}")
    digest = hashlib.sha256()
    request = proxy_request(
        proxy.port, "GET", big_body_upstream.url + f"/blob?size={BIG}&framing={framing}"
    )
    with (
        RSSSampler(proxy) as rss,
        StreamReader(proxy.port, request, timeout=45, keep_body=False, on_data=digest.update) as s,
    ):
        assert s.read_head() == 200
        s.read_all(timeout=45)
    assert s.complete
    assert s.received == BIG
    assert digest.hexdigest() == body_sha256(BIG)
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB, (
        f"RSS grew {rss.growth_kib} KiB (baseline {rss.baseline}, peak {rss.peak})"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_100mb_streamed_flat_rss(
    proxy_factory: ProxyFactory, big_body_upstream: BigBodyUpstream, chunked: bool
) -> None:
    """
    A 100 MB request body is admitted by the default limit (no --max-body)
    and streamed, not buffered: the upstream has received bytes before the
    client has sent half of it, the upload arrives complete and
    byte-identical, and the proxy's RSS grows by less than 30 MB.
    """
    proxy = proxy_factory(*LOOPBACK_ARGS)
    _warm_up(proxy, big_body_upstream.url + "/blob?size=1000")
    framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(BIG))]
    head = proxy_request(
        proxy.port,
        "PUT",
        big_body_upstream.url + "/upload",
        [("Content-Type", "application/octet-stream"), *framing],
    )
    received_at_half: int | None = None
    with RSSSampler(proxy) as rss, RawClient(proxy.port, timeout=45) as client:
        client.send(head)
        sent = 0
        for piece in generate_body(BIG):
            client.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            if received_at_half is None and sent >= BIG // 2:
                uploads = big_body_upstream.uploads
                received_at_half = uploads[0].bytes if uploads else 0
        if chunked:
            client.send(b"0\r\n\r\n")
        client_done_at = time.monotonic()
        resp = client.read_response(method="PUT", timeout=45)
    assert resp.status == 200, resp.body[:300]
    assert resp.json() == {"bytes": BIG, "sha256": body_sha256(BIG)}
    (upload,) = big_body_upstream.uploads
    assert upload.first_body_at is not None and upload.first_body_at < client_done_at
    assert received_at_half, "the upstream had no body byte when the client had sent half"
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB, (
        f"RSS grew {rss.growth_kib} KiB (baseline {rss.baseline}, peak {rss.peak})"
    )


@pytest.mark.timeout(20)
@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_client_abort_mid_stream_closes_upstream(
    loopback_proxy: ProxyProcess, sse_upstream: SSEUpstream, rst: bool
) -> None:
    """
    T20: a client that leaves after 3 SSE events makes the proxy close the
    upstream connection within 500 ms; exactly one upstream request.
    """
    sse_upstream.events = 200
    sse_upstream.interval = 0.02
    request = _sse_request(loopback_proxy, sse_upstream, "/v1/chat/completions")
    with StreamReader(loopback_proxy.port, request) as s:
        assert s.read_head() == 200
        assert s.read_until(lambda b: b.count(b"\n\n") >= 3)
        aborted_at = s.abort(rst=rst)
    assert sse_upstream.client_closed.wait(3), "upstream connection still open 3 s after abort"
    closed_at = sse_upstream.streams[0].client_closed_at
    assert closed_at is not None
    assert closed_at - aborted_at < 0.5, f"upstream closed {closed_at - aborted_at:.3f}s later"
    assert len(sse_upstream.requests) == 1
    assert not sse_upstream.completed.is_set()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_client_abort_before_headers_closes_upstream(
    loopback_proxy: ProxyProcess, sse_upstream: SSEUpstream, rst: bool
) -> None:
    """
    T20: a client that leaves while the upstream has not answered yet (it
    delays its headers 3 s) makes the proxy close the upstream connection
    within 500 ms.
    """
    sse_upstream.first_delay = 3.0
    request = _sse_request(loopback_proxy, sse_upstream, "/v1/chat/completions")
    with StreamReader(loopback_proxy.port, request) as s:
        assert sse_upstream.wait_for(
            lambda: any(r.completed_at for r in sse_upstream.requests), timeout=5
        ), "request never reached the upstream"
        aborted_at = s.abort(rst=rst)
    assert sse_upstream.client_closed.wait(3), "upstream connection still open 3 s after abort"
    closed_at = sse_upstream.streams[0].client_closed_at
    assert closed_at is not None
    assert closed_at - aborted_at < 0.5, f"upstream closed {closed_at - aborted_at:.3f}s later"
    assert len(sse_upstream.requests) == 1


@pytest.mark.timeout(60)
def test_pooled_connection_reused_after_large_response(proxy_factory: ProxyFactory) -> None:
    """
    A keep-alive upstream connection that carried a large response to a
    slow client (so backpressure paused it, possibly right at the end)
    serves the next request normally: the small request that follows is
    answered 200 at once, not left waiting for headers the upstream has
    already sent.  Repeated on fresh upstreams, since the end-of-body
    timing varies.
    """
    proxy = proxy_factory(
        "--allow-cidr", "127.0.0.1/32", "--header-timeout", "2", "--idle-timeout", "2"
    )
    for attempt in range(6):
        with BigBodyUpstream() as upstream:
            big = proxy_request(proxy.port, "GET", upstream.url + f"/blob?size={3 * MiB}")
            with StreamReader(proxy.port, big, rcvbuf=65536, keep_body=False) as s:
                assert s.read_head() == 200
                time.sleep(0.3)
                s.read_all()
            assert s.complete and s.received == 3 * MiB
            started = time.monotonic()
            small = proxy_request(proxy.port, "GET", upstream.url + "/blob?size=1000")
            resp = raw_request(proxy.port, small, timeout=15)
            took = time.monotonic() - started
            assert resp.status == 200, (
                f"attempt {attempt}: the request after a 3 MiB one got "
                f"{resp.status} {resp.body[:120]!r} in {took:.2f}s "
                f"(upstream connections: {upstream.connection_count})"
            )
            assert len(resp.body) == 1000
