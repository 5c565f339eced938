"""Self-tests of the shared harness: the fake upstreams and clients, without the proxy."""

from __future__ import annotations

import time

import pytest
from support.clients import RawClient, StreamReader, build_request
from support.proxy import ProcessStartError, ProxyProcess
from support.upstreams import (
    BigBodyUpstream,
    RawScriptUpstream,
    ReadRequest,
    RecordingUpstream,
    Reset,
    Response,
    Send,
    SSEUpstream,
    body_sha256,
    closed_port,
    generate_body,
)

pytestmark = pytest.mark.timeout(20)


def test_recording_upstream_records_raw_pairs_and_keeps_alive(
    recording_upstream: RecordingUpstream,
) -> None:
    """Requests are recorded with raw header pairs and body; keep-alive works."""
    recording_upstream.queue(Response(302, [("Location", "/elsewhere")]))
    with RawClient(recording_upstream.port) as client:
        first = client.request("POST", "/a?x=1", [("X-Case", "Keep")], b"hello")
        second = client.request("GET", "/b")
    assert first.status == 302
    assert first.header("location") == b"/elsewhere"
    assert second.status == 200
    assert second.json()["usage"]["total_tokens"] == 12
    reqs = recording_upstream.wait_requests(2)
    assert [r.target for r in reqs] == [b"/a?x=1", b"/b"]
    assert (b"X-Case", b"Keep") in reqs[0].headers
    assert reqs[0].body == b"hello"
    assert recording_upstream.connection_count == 1
    assert recording_upstream.connections[0].closed.wait(2)
    assert recording_upstream.connections[0].close_reason == "client_eof"


def test_sse_upstream_paces_events_and_sees_early_close(sse_upstream: SSEUpstream) -> None:
    """Events arrive one by one at the configured pace; an early close is noticed at once."""
    sse_upstream.interval = 0.1
    request = build_request("POST", "/v1/chat/completions", body=b"{}", host="x")
    with StreamReader(sse_upstream.port, request) as stream:
        assert stream.read_head() == 200
        body = stream.read_all()
    assert stream.complete
    assert body == sse_upstream.body_for()
    assert stream.chunks[-1][0] - stream.chunks[1][0] >= 0.4
    with StreamReader(sse_upstream.port, request) as stream:
        stream.read_until(lambda b: b.count(b"\n\n") >= 2)
        aborted_at = stream.abort()
    assert sse_upstream.client_closed.wait(2)
    closed_at = sse_upstream.streams[-1].client_closed_at
    assert closed_at is not None and closed_at - aborted_at < 0.2


def test_big_body_upstream_streams_and_counts() -> None:
    """Downloads are generated on the fly; uploads are counted and hashed, not stored."""
    size = 3_000_000
    with BigBodyUpstream(size=size) as upstream, RawClient(upstream.port) as client:
        down = client.request("GET", "/blob")
        assert len(down.body) == size
        chunked = client.request("GET", "/blob?framing=chunked&size=1000")
        assert chunked.header("transfer-encoding") == b"chunked"
        assert len(chunked.body) == 1000
        up = client.request("PUT", "/up", body=b"".join(generate_body(size)))
        assert up.json() == {"bytes": size, "sha256": body_sha256(size)}
        assert upstream.uploads[0].request.body == b""


def test_raw_script_upstream_runs_steps(raw_upstream: RawScriptUpstream) -> None:
    """A raw script can send a truncated body and reset the connection."""
    raw_upstream.script = [
        ReadRequest(),
        Send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
        Reset(),
    ]
    with RawClient(raw_upstream.port) as client:
        client.send(build_request("GET", "/", host="x"))
        response = client.read_response()
    assert (response.status, response.body, response.complete) == (200, b"abc", False)
    assert raw_upstream.connections[0].close_reason == "server_reset"


def test_closed_port_refuses() -> None:
    """The closed-port helper gives a port that refuses connections."""
    port = closed_port()
    with pytest.raises(ConnectionRefusedError):
        RawClient(port, timeout=1)


def test_process_start_failure_reports_log_tail(tmp_path: object) -> None:
    """A twistd process that cannot start raises with its log tail, and leaves nothing behind."""
    proc = ProxyProcess(["--no-such-option-xyz"], start_timeout=10)
    started = time.monotonic()
    with pytest.raises(ProcessStartError) as info:
        proc.start()
    assert time.monotonic() - started < 10
    assert "no-such-option-xyz" in str(info.value)
    assert not proc.running
    proc.cleanup()
