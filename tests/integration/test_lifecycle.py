"""Proxy life cycle with real processes: SIGTERM drains, SIGKILL loses nothing spooled.

RELIABILITY.md T27 and T29, scaled down: a stream in flight when SIGTERM
arrives finishes and is recorded, and the process exits 0; events spooled
while the collector was down survive a SIGKILL of the proxy and reach the
collector after a restart, each exactly once.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import (
    RawClient,
    StreamReader,
    chat_calls,
    chat_request,
    proxy_request,
    raw_request,
)
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import BigBodyUpstream, RecordingUpstream, SSEUpstream, closed_port


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _spool_calls_then_kill(proxy: ProxyProcess, upstream_url: str, calls: int) -> None:
    """Start C{proxy}, make C{calls} chat calls through it, wait until they
    are all spooled (and past an fsync), then SIGKILL it."""
    proxy.start()
    try:
        chat_calls(proxy.port, upstream_url, calls)
        _wait_for(
            lambda: _get_json(proxy.url + "/health")["events_waiting"] >= calls,
            10,
            "events to be spooled",
        )
        time.sleep(0.2)  # past the spool's fsync interval (50 ms)
    finally:
        proxy.kill()


@pytest.mark.timeout(40)
def test_sigterm_lets_an_in_flight_stream_finish_records_it_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: stop listening, finish the stream in flight, keep its event, exit 0."""
    with SSEUpstream(events=8, interval=0.15) as upstream:
        proxy = ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--drain-timeout",
                "8",
            ],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            request = chat_request(
                proxy.port,
                upstream.url,
                b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}',
            )
            with StreamReader(proxy.port, request, timeout=20) as stream:
                assert stream.read_head() == 200
                proxy.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                body = stream.read_all(timeout=15)
                assert stream.complete, "the in-flight stream was cut by the drain"
            assert body.endswith(b"data: [DONE]\n\n")
            time.sleep(0.3)  # the listener closes within a reactor turn of SIGTERM
            with pytest.raises(OSError):
                raw_request(
                    proxy.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=2
                )
            code = proxy.wait(timeout=12)
            assert code == 0, proxy.log_tail()
            assert time.monotonic() - sent < 10
        db = proxy.home / "events.sqlite3"
        rows = (
            sqlite3.connect(db)
            .execute("SELECT provider, model, outcome FROM events WHERE kind = 'call'")
            .fetchall()
        )
    assert len(rows) == 1, rows
    provider, model, outcome = rows[0]
    assert (provider, outcome) == ("openai", "ok")
    assert model is not None and model.startswith("gpt-4o-mini")


@pytest.mark.timeout(60)
def test_events_spooled_before_a_sigkill_reach_the_collector_after_restart(
    tmp_path: Path,
) -> None:
    """Collector down, 30 calls, SIGKILL the proxy, start the collector and the
    proxy again on the same spool: all 30 events arrive, none twice."""
    calls = 30
    collector_port = closed_port()
    workdir = tmp_path / "proxy"
    with RecordingUpstream() as upstream:
        args = [
            *LOOPBACK_ARGS,
            "--provider-host",
            f"127.0.0.1:{upstream.port}=openai",
            "--collector",
            f"http://127.0.0.1:{collector_port}",
        ]
        _spool_calls_then_kill(ProxyProcess(args, workdir=workdir), upstream.url, calls)

        collector = CollectorProcess(
            db=tmp_path / "collector.db",
            port=f"tcp:{collector_port}:interface=127.0.0.1",
            workdir=tmp_path / "collector",
        )
        with collector:
            second = ProxyProcess(args, workdir=workdir)
            with second:
                _wait_for(
                    lambda: _get_json(collector.url + "/health")["events_stored"] >= calls,
                    20,
                    "the replayed events at the collector",
                )
                time.sleep(0.5)
                events = _get_json(collector.url + "/api/events?limit=1000")
    items = events["events"] if isinstance(events, dict) else events
    calls_seen = [e for e in items if e.get("kind", "call") == "call"]
    ids = [e["id"] for e in calls_seen]
    assert len(ids) == calls, len(ids)
    assert len(set(ids)) == calls
    assert {e["provider"] for e in calls_seen} == {"openai"}


@pytest.mark.timeout(90)
def test_a_thousand_calls_during_a_collector_outage_all_arrive_once(tmp_path: Path) -> None:
    """T25(a): collector down, 1,000 calls, collector up: 1,000 distinct events, 0 lost."""
    calls = 1000
    collector_port = closed_port()
    with RecordingUpstream() as upstream:
        proxy = ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--collector",
                f"http://127.0.0.1:{collector_port}",
            ],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            request = chat_request(proxy.port, upstream.url)
            with RawClient(proxy.port) as client:  # one keep-alive connection
                for _ in range(calls):
                    client.send(request)
                    assert client.read_response(method="POST").status == 200
            assert _get_json(proxy.url + "/health")["collector"]["state"] != "connected"
            collector = CollectorProcess(
                db=tmp_path / "collector.db",
                port=f"tcp:{collector_port}:interface=127.0.0.1",
                workdir=tmp_path / "collector",
            )
            with collector:
                _wait_for(
                    lambda: _get_json(collector.url + "/health")["events_stored"] >= calls,
                    30,
                    "1,000 events at the collector",
                )
                _wait_for(
                    lambda: _get_json(proxy.url + "/health")["events_waiting"] == 0,
                    10,
                    "the proxy's spool to drain",
                )
                health = _get_json(collector.url + "/health")
    assert health["events_stored"] == calls


@pytest.mark.timeout(40)
def test_a_client_that_stops_reading_is_dropped_at_the_write_timeout(tmp_path: Path) -> None:
    """T14, second phase: a client that never reads a large response loses its
    connection after --client-write-timeout, and the proxy is idle again."""
    with BigBodyUpstream() as upstream:
        proxy = ProxyProcess(
            [*LOOPBACK_ARGS, "--client-write-timeout", "2", "--idle-timeout", "30"],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", proxy.port))
            sock.sendall(proxy_request(proxy.port, "GET", upstream.url + "/blob?size=104857600"))
            started = time.monotonic()
            _wait_for(
                lambda: _get_json(proxy.url + "/health")["in_flight"] == 1, 5, "the call to start"
            )
            _wait_for(
                lambda: _get_json(proxy.url + "/health")["in_flight"] == 0,
                10,
                "the unread call to be dropped",
            )
            assert time.monotonic() - started < 8
            sock.settimeout(5)
            with pytest.raises(OSError):  # reset: the rest of the body never comes
                while sock.recv(65536):
                    pass
            sock.close()


@pytest.mark.timeout(60)
def test_embedded_events_spooled_before_a_sigkill_are_stored_after_restart(
    tmp_path: Path,
) -> None:
    """Embedded mode, the store unusable (its directory cannot be created), 20
    calls, SIGKILL: after a restart with a usable store every event is
    replayed from the spool into it, once (the writer converts records
    without rows made ahead: the replay path)."""
    calls = 20
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    db = blocker / "events.sqlite3"
    workdir = tmp_path / "proxy"
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        args += ["--db", str(db)]
        _spool_calls_then_kill(ProxyProcess(args, workdir=workdir), upstream.url, calls)
        blocker.unlink()
        with ProxyProcess(args, workdir=workdir) as second:
            _wait_for(
                lambda: _get_json(second.url + "/health")["events_waiting"] == 0,
                20,
                "the replayed events in the store",
            )
    rows = sqlite3.connect(db).execute("SELECT id, provider FROM events WHERE kind = 'call'")
    found = rows.fetchall()
    assert len(found) == calls, found
    assert len({event_id for event_id, _ in found}) == calls
    assert {provider for _, provider in found} == {"openai"}


@pytest.mark.timeout(60)
def test_streams_cut_at_the_drain_deadline_are_recorded_as_shutdown_aborted(
    tmp_path: Path,
) -> None:
    """Issue 13 item 1 (T29's variant): SIGTERM with --drain-timeout 2 during
    streams far longer than that. Every stream is cut at the deadline, the
    process exits 0, and every call has its event in the store, with outcome
    C{shutdown_aborted} and the usage the stream carried so far (Anthropic's
    message_start gives the input tokens). A call still waiting for its
    response head gets a 503 and is recorded the same way. Before, the sink
    closed the spool first and all of them were lost."""
    streams = 16
    with (
        SSEUpstream(events=200, interval=0.05, flavor="anthropic") as upstream,
        SSEUpstream(first_delay=20) as silent,
    ):
        proxy = ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=anthropic",
                "--provider-host",
                f"127.0.0.1:{silent.port}=openai",
                "--drain-timeout",
                "2",
            ],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            readers = []
            try:
                for _ in range(streams):
                    request = proxy_request(
                        proxy.port,
                        "POST",
                        upstream.url + "/v1/messages",
                        [("Content-Type", "application/json")],
                        b'{"model":"claude-3-5-sonnet-20241022","stream":true,"messages":[]}',
                    )
                    reader = StreamReader(proxy.port, request, timeout=30)
                    readers.append(reader)
                    assert reader.read_head() == 200
                for reader in readers:
                    reader.read_until(lambda body: body.count(b"\n\n") >= 3, timeout=10)
                waiting = StreamReader(proxy.port, chat_request(proxy.port, silent.url), timeout=30)
                readers.append(waiting)
                _wait_for(lambda: len(silent.streams) == 1, 10, "the head-less call upstream")
                proxy.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                assert waiting.read_head(timeout=15) == 503
                assert b"shutting_down" in waiting.read_all(timeout=5)
                for reader in readers[:-1]:
                    reader.read_all(timeout=15)
                    assert not reader.complete, "a 10-s stream outlived a 2-s drain"
            finally:
                for reader in readers:
                    reader.close()
            code = proxy.wait(timeout=15)
            assert code == 0, proxy.log_tail()
            assert time.monotonic() - sent < 2 + 6, "exit within the deadline and the flush"
        rows = (
            sqlite3.connect(proxy.home / "events.sqlite3")
            .execute(
                "SELECT outcome, provider, input_tokens FROM events"
                " WHERE kind = 'call' AND status = 200"
            )
            .fetchall()
        )
    assert len(rows) == streams, (rows, proxy.log_tail())
    assert {outcome for outcome, _, _ in rows} == {"shutdown_aborted"}
    assert {provider for _, provider, _ in rows} == {"anthropic"}
    assert {tokens for _, _, tokens in rows} == {25}
    cut_early = (
        sqlite3.connect(proxy.home / "events.sqlite3")
        .execute("SELECT outcome, provider FROM events WHERE kind = 'call' AND status = 503")
        .fetchall()
    )
    assert cut_early == [("shutdown_aborted", "openai")]
