"""Smoke tests of the overhead benchmark: it runs end to end and prints its answer lines."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_overhead_quick_prints_answer_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{python -m bench.overhead --quick --with-bare --gap-ms 5} exits 0 and
    prints exactly five stdout lines that the documented patterns parse:
    the answer; the floor (stock portforward, same run) with the proxy's
    ratios to it; the bare proxy with its p99 ratio; the concurrent
    streams with every event relayed; and c=1 with idle gaps (no timing
    assertions: the figures depend on the machine).
    """
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.overhead import ANSWER_RE, BARE_RE, FLOOR_RE, SPARSE_RE, STREAMS_RE

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.overhead",
            "--quick",
            "--loadgen",
            "python",
            "--with-bare",
            "--gap-ms",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    match = ANSWER_RE.match(lines[0])
    assert match, lines[0]
    assert int(match["conc"]) == 64
    assert int(match["direct"]) > 0 and int(match["proxied"]) > 0
    assert int(match["rss"]) > 0
    floor = FLOOR_RE.match(lines[1])
    assert floor, lines[1]
    assert int(floor["conc"]) == 64
    assert int(floor["rps"]) > 0 and int(floor["cpu"]) > 0
    assert floor["rps_ratio"] == f"{int(match['proxied']) / int(floor['rps']):.2f}x"
    bare = BARE_RE.match(lines[2])
    assert bare, lines[2]
    assert int(bare["rps"]) > 0
    streams = STREAMS_RE.match(lines[3])
    assert streams, lines[3]
    assert int(streams["conc"]) == 64
    assert int(streams["expected"]) == 64 * 40  # --quick: 40 events per stream
    assert int(streams["events"]) == int(streams["expected"])
    assert float(streams["cpu"]) > 0
    sparse = SPARSE_RE.match(lines[4])
    assert sparse, lines[4]
    assert sparse["gap"] == "5"


@pytest.mark.timeout(60)
def test_floor_relays_bytes_to_the_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{bench._floor} (stock portforward) prints its port and relays a
    keep-alive connection's requests to the upstream and its answers back
    unchanged; it exits once its stdin closes.
    """
    upstream, up_port = _start_upstream()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench._floor", "--upstream-port", str(up_port)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert floor.stdout is not None
        line = floor.stdout.readline().decode()
        assert line.startswith("PORT "), line
        port = int(line.split()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(2):
                sock.sendall(_post(up_port, "/v1/sse/chat/completions"))
                monkeypatch.syspath_prepend(str(ROOT))
                from bench._upstream import SSE_FIRST, SSE_REST

                expected = SSE_FIRST + SSE_REST
                got = b""
                while len(got) < len(expected):
                    data = sock.recv(65536)
                    assert data, got
                    got += data
                assert got == expected
    finally:
        _stop(floor)
        _stop(upstream)
    assert floor.returncode == 0


def _start_upstream(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench._upstream", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert popen.stdout is not None
    line = popen.stdout.readline().decode()
    assert line.startswith("PORT "), line
    return popen, int(line.split()[1])


def _stop(popen: subprocess.Popen[bytes]) -> None:
    assert popen.stdin is not None
    popen.stdin.close()  # EOF on stdin: the upstream's way out
    try:
        popen.wait(5)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(5)


def _post(port: int, path: str) -> bytes:
    body = b'{"stream":true}'
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_chunked(sock: socket.socket) -> tuple[bytes, list[bytes]]:
    """One chunked response off C{sock}: its head and its chunks' data."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, buf
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        while b"\r\n" not in buf:
            data = sock.recv(65536)
            assert data, buf
            buf += data
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line, 16)
        while len(buf) < size + 2:
            data = sock.recv(65536)
            assert data, buf
            buf += data
        assert buf[size : size + 2] == b"\r\n"
        if size == 0:
            return head, chunks
        chunks.append(buf[:size])
        buf = buf[size + 2 :]


@pytest.mark.timeout(60)
def test_upstream_stream_mode_paces_one_event_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A target containing C{/stream} gets a chat-completion SSE stream of
    C{--stream-events} events, one chunk each, paced C{--stream-interval}
    apart, with the usage in the last event before C{data: [DONE]}; a
    target containing C{/sse} still gets the short canned stream.
    """
    monkeypatch.syspath_prepend(str(ROOT))
    from bench._upstream import SSE_FIRST, SSE_REST

    upstream, port = _start_upstream("--stream-events", "12", "--stream-interval", "0.01")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(_post(port, "/v1/stream/chat/completions"))
            head, chunks = _read_chunked(sock)
            elapsed = time.monotonic() - t0
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-type: text/event-stream" in head.lower()
            assert len(chunks) == 12
            assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
            assert all(c.count(b"data:") == 1 for c in chunks)
            assert chunks[-1] == b"data: [DONE]\n\n"
            events = [json.loads(c[6:]) for c in chunks[:-1]]
            assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
            assert events[-1]["choices"] == []
            assert events[-1]["usage"]["completion_tokens"] == 9
            assert elapsed >= 11 * 0.01 * 0.9  # paced, not written at once
            # Keep-alive: the same connection then serves the short SSE mode.
            sock.sendall(_post(port, "/v1/sse/chat/completions"))
            expected = SSE_FIRST + SSE_REST
            got = b""
            while len(got) < len(expected):
                data = sock.recv(65536)
                assert data, got
                got += data
            assert got == expected
    finally:
        _stop(upstream)


@pytest.mark.timeout(60)
def test_loadgen_streams_mode_counts_first_chunks_and_events() -> None:
    """
    C{bench._loadgen streams} keeps C{--concurrency} streams in flight for
    C{--rounds} streams per connection and reports one first-chunk time
    per stream and every C{data:} event received, with no errors.
    """
    upstream, port = _start_upstream("--stream-events", "10", "--stream-interval", "0.005")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench._loadgen",
                "streams",
                "--port",
                str(port),
                "--request",
                _post(port, "/v1/stream/chat/completions").hex(),
                "--concurrency",
                "4",
                "--rounds",
                "3",
                "--stagger",
                "0.02",
                "--expect-events",
                "10",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
    finally:
        _stop(upstream)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["streams_completed"] == 12
    assert result["events"] == 120
    assert result["first_chunk_us"]["n"] == 12
    assert result["total_us"]["n"] == 12
    assert 0 < result["first_chunk_us"]["p50"] <= result["total_us"]["p50"]
    assert result["errors"] == result["non2xx"] == result["short_streams"] == 0


def test_budget_check_runs_its_rig_with_and_without_budgets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """C{bench.budget_check} builds both in-memory rigs, relays its warm-up
    and a few rounds through each, measures the floor beside them (stock
    portforward, on loopback), and prints its one answer line (it once
    failed at start-up when C{RelayServices} gained a parameter)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.budget_check import main

    assert main(["--requests", "20", "--repeats", "1", "--body-bytes", "3000"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("budgets: ") and "added CPU per call with 10 budgets" in line
    assert ", a 30" in line  # about 3,000 bytes
    floor = re.search(r"floor cpu/req (\d+)us \(median of 2, ", line)
    assert floor and int(floor.group(1)) > 0, line
    assert "us on the anchors' machine (target: under 10us, 0.263x)" in line


def test_budget_instructions_counted_run_relays_with_fixed_clocks() -> None:
    """C{bench.budget_instructions}' counted run (what valgrind runs, here
    without it): the budgeted rig relays its calls with the clocks replaced
    by counters, and leaves this process's clocks alone (a subprocess)."""
    for rig in ("with", "without"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.budget_instructions", "--child", rig, "--calls", "50"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
