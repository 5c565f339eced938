"""
RELIABILITY.md T28 at its CI length: sustained mixed load through a real proxy.

100 concurrent clients for C{LLMOBSERVE_T28_SECONDS} (90 s by default, the
spec's CI mode, about 3.5 minutes in all with the probe and the baseline;
its soak is 600, and a quick local check 8): 80 connections running long
SSE streams back to back (200 events each, from the benchmark's fake OpenAI
upstream) and 20 running paced chat completions, plus big (20 MB) JSON
responses to load the parse pool. The same mix first runs straight to the
upstreams: the baseline of the same run. The load generator is the
benchmark's (C{bench._loadgen}, its own processes); the proxy is a real
C{twistd llmobserve} with its embedded store, pinned to a core of its own as
in the benchmark (everything else shares the others), so that what is
compared is the proxy and not the contention on 2 cores.

Machines of this kind differ by 2.5x in CPython speed, and CI may share its
cores, so the load is sized from the capacity measured in the same run: a
short probe of the proxy's and of the upstream's chat rate, then the mix at a
fixed fraction of it (L{Mix.sized}). At full size (streams of 200 events 10 ms
apart, chat paced 10 ms apart per connection, 5 big responses a second: the
spec's figures) the mix costs the proxy about as much as L{FULL_MIX_LOAD} chat
requests a second; it runs at full size only where that is at most
L{LOAD_FRACTION} of the proxy's measured rate, and slower in proportion
elsewhere. The side probes (C{/health} from its own process, a C{/metrics}
poller) run in both phases, so both see the same machine; the latency checks
are against the baseline of the same run, with the spec's absolute floors
(5 ms, 10 ms) stretched by how much slower than the reference machine
(L{REFERENCE_RPS}) this one measured.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
from support.clients import proxy_request, raw_request
from support.load import HEALTH_REQUEST, ROOT, loadgen, results
from support.proxy import LOOPBACK_ARGS, ProxyProcess, RSSSampler
from support.upstreams import MiB, RecordingUpstream, Response

SECONDS = float(os.environ.get("LLMOBSERVE_T28_SECONDS", "90"))
#: Runs this long are the spec's soak: RSS must also stop climbing. Over the
#: CI run's last 45 s a slope is noise (20 MB bodies come and go; one
#: clean-clone run measured 1.2 MiB/min there, another 10 MiB of growth in all).
SOAK_SECONDS = 300
STREAMS = 80
STREAM_EVENTS = 200
CHAT_CLIENTS = 20
#: Seconds of each capacity probe (c=64 chat, through the proxy, then direct).
PROBE_SECONDS = 2.0
#: The chat rate (requests/s, c=64, events on) the proxy measured on the
#: machine the spec's figures were set on (docs/BENCHMARKS.md: 10.5k).
REFERENCE_RPS = 10_000.0
#: What the full-size mix costs the proxy, in chat requests a second: 2,000
#: chats, 8,000 stream events at about a fifth of a chat each, 40 stream
#: starts, 5 big responses at about 200 chats each (20 MB relayed and cut).
FULL_MIX_LOAD = 2000 + 8000 / 5 + 40 + 5 * 200
#: The share of the proxy's measured capacity the mix may use (0.45 missed the
#: chat p99 by 12% in one quiet clean-clone run of four on the slower machine).
LOAD_FRACTION = 0.35
#: Never below a twentieth of full size: a machine that slow fails the probe's own check.
MIN_SCALE = 0.05
BIG_BODY = (
    b'{"id":"chatcmpl-big","object":"chat.completion","model":"gpt-4o-mini",'
    b'"usage":{"prompt_tokens":10,"completion_tokens":5},"padding":"' + b"x" * (20 * MiB) + b'"}'
)


@attrs.frozen
class Mix:
    """The mixed load at one size: 1.0 is the spec's figures."""

    scale: float
    #: How much slower than the reference machine this one measured (>= 1).
    slowness: float
    #: The probe's figures, for the record.
    proxy_rps: float
    direct_rps: float

    @classmethod
    def sized(cls, proxy_rps: float, direct_rps: float) -> Mix:
        """The mix at L{LOAD_FRACTION} of the slower of the two measured rates."""
        capacity = min(proxy_rps, direct_rps)
        assert capacity * LOAD_FRACTION >= FULL_MIX_LOAD * MIN_SCALE, (
            f"too slow for T28: proxy {proxy_rps:.0f} rps, direct {direct_rps:.0f} rps"
        )
        return cls(
            scale=min(1.0, LOAD_FRACTION * capacity / FULL_MIX_LOAD),
            slowness=max(1.0, REFERENCE_RPS / proxy_rps),
            proxy_rps=proxy_rps,
            direct_rps=direct_rps,
        )

    @property
    def stream_interval_ms(self) -> int:
        return round(10 / self.scale)

    @property
    def chat_gap(self) -> float:
        return 0.01 / self.scale

    @property
    def big_per_second(self) -> float:
        return 5 * self.scale

    @property
    def chat_p99_floor_us(self) -> float:
        return 5000 * self.slowness

    @property
    def first_event_allowance_us(self) -> float:
        return 10_000 * self.slowness

    def paced(self, stream_request: bytes) -> bytes:
        """C{stream_request} asking the upstream for this mix's event interval."""
        path = b"/v1/stream/chat/completions"
        assert stream_request.count(path) == 1, stream_request
        return stream_request.replace(path, path + b"?interval_ms=%d" % self.stream_interval_ms)


@contextmanager
def _bench_upstream() -> Iterator[int]:
    """The benchmark's fake OpenAI upstream (its own process): its port."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench._upstream", "--stream-events", "200"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline().decode()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        popen.terminate()
        popen.wait(10)


class _Every(threading.Thread):
    """Calls C{probe} every C{interval} seconds until stopped; keeps what it returns."""

    def __init__(self, interval: float, probe: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.probe = probe
        self.values: list[Any] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.values.append(self.probe())
            except Exception as e:  # recorded, asserted on by the test
                self.errors.append(repr(e))
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


def _mixed_load(
    port: int, requests: dict[str, bytes], key: str, mix: Mix, big: Callable[[], int]
) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """The streams, the paced chat load and the big responses, together,
    against C{port} (and C{big}'s target): the two load results and the big
    responses' statuses."""
    big_statuses = _Every(1 / mix.big_per_second, big)
    big_statuses.start()
    try:
        streams = loadgen(
            "streams",
            port,
            mix.paced(requests[key + "_stream"]),
            SECONDS,
            *("--concurrency", str(STREAMS), "--rounds", "0", "--stagger", "1"),
            *("--expect-events", str(STREAM_EVENTS)),
        )
        chat = loadgen(
            "throughput",
            port,
            requests[key],
            SECONDS,
            *("--concurrency", str(CHAT_CLIENTS), "--gap", str(mix.chat_gap), "--warmup", "0"),
            "--drain",
        )
        stream_result, chat_result = results(
            streams, chat, timeout=SECONDS + STREAM_EVENTS * mix.stream_interval_ms / 1000 + 90
        )
    finally:
        big_statuses.stop()
    assert not big_statuses.errors, big_statuses.errors[:3]
    return stream_result, chat_result, big_statuses.values


def _capacity(port: int, request: bytes) -> float:
    """Chat requests a second at c=64 against C{port}: a short probe."""
    (result,) = results(
        loadgen("throughput", port, request, PROBE_SECONDS, "--concurrency", "64", "--drain")
    )
    assert result["errors"] == 0 and result["non2xx"] == 0, result
    return float(result["rps"])


def _metrics(port: int) -> dict[str, float]:
    resp = raw_request(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)
    samples = {}
    for line in resp.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#"):
            samples[name] = float(value)
    return samples


def _big_fetch(port: int, request: bytes) -> int:
    """One 20 MB response through the proxy, read and thrown away: its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                return 0
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        left = length - len(rest)
        buffer = bytearray(1 << 20)
        while left > 0:
            n = sock.recv_into(buffer)
            if not n:
                return 0
            left -= n
        return int(head.split(b" ", 2)[1])


def _settled(port: int, limit: float = 30.0) -> dict[str, float]:
    """Metrics once every call so far is a stored event (nothing waiting, count still)."""
    deadline = time.monotonic() + limit
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        now = _metrics(port)
        if (
            last
            and now["llmobserve_events_waiting"] == 0
            and now["llmobserve_parse_queue"] == 0
            and now["llmobserve_events_total"] == last["llmobserve_events_total"]
        ):
            return now
        last = now
        time.sleep(0.2)
    return last


@attrs.frozen
class _Phase:
    """What one phase (baseline or proxied) measured."""

    streams: dict[str, Any]
    chat: dict[str, Any]
    big: list[int]
    health: dict[str, Any]


@pytest.mark.slow
@pytest.mark.timeout(2 * (SECONDS + STREAM_EVENTS * 0.01 / MIN_SCALE) + 240)
def test_sustained_mixed_load_keeps_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    T28: no error and no non-2xx from the proxy; every stream complete;
    chat p99 added by the proxy within max(5 ms, twice the baseline p99) and
    the SSE first event within 10 ms of the baseline's (5 and 10 ms
    stretched by the machine's measured slowness); the event loop answers
    /health within 100 ms (p99) throughout; one stored event per request,
    the parse queue never past its cap (a call over it is recorded as
    parse_skipped, never delayed); afterwards the open files are back to
    where they were (idle pooled upstream connections aside, which the pool
    closes after 30 s), and RSS grew by less than 64 MiB (in the soak, 300 s
    or more, also less than 1 MiB a minute over the second half).
    """
    monkeypatch.syspath_prepend(str(ROOT))
    big = RecordingUpstream(Response(headers=[("Content-Type", "application/json")], body=BIG_BODY))
    cores = sorted(os.sched_getaffinity(0))
    pinned = len(cores) >= 2
    if pinned:  # the proxy alone on the last core; this process and its children on the rest
        os.sched_setaffinity(0, set(cores[:-1]))
    try:
        with big, _bench_upstream() as up_port:
            proxy = ProxyProcess(
                (
                    *LOOPBACK_ARGS,
                    *("--provider-host", f"127.0.0.1:{up_port}=openai"),
                    *("--provider-host", f"{big.authority}=openai"),
                    *("--client-timeout", "60", "--idle-timeout", "60"),
                ),
                workdir=tmp_path,
            ).start()
            with proxy:
                if pinned:
                    proxy.set_affinity({cores[-1]})
                outcome = _run_t28(proxy, up_port, big)
    finally:
        os.sched_setaffinity(0, set(cores))
    _check_t28(*outcome)


def _run_t28(proxy: ProxyProcess, up_port: int, big: RecordingUpstream) -> tuple[Any, ...]:
    from bench.overhead import _build_requests

    requests = _build_requests(up_port, proxy.port, "proxy")
    direct_big = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\n\r\n"
        % big.authority.encode()
    )
    proxied_big = proxy_request(proxy.port, "POST", big.url + "/v1/chat/completions")
    # warm up: pooled connections, price caches, the store
    assert _big_fetch(proxy.port, proxied_big) == 200
    for key in ("proxied", "proxied_stream"):
        assert raw_request(proxy.port, requests[key], timeout=10).status == 200

    # the probe: this machine's capacity, now, for this run's sizes
    mix = Mix.sized(
        proxy_rps=_capacity(proxy.port, requests["proxied"]),
        direct_rps=_capacity(up_port, requests["direct"]),
    )
    print(f"T28 sized: {mix}")
    big_port = int(big.authority.rsplit(":", 1)[1])
    phases_gauges: list[list[dict[str, float]]] = []

    def phase(port: int, key: str, fetch: Callable[[], int]) -> _Phase:
        """One phase of the mix, with the same side probes (both at the proxy)."""
        gauges = _Every(0.25, lambda: _metrics(proxy.port))
        health = loadgen("latency", proxy.port, HEALTH_REQUEST, SECONDS + 2, "--gap", "0.05")
        gauges.start()
        try:
            load = _mixed_load(port, requests, key, mix, fetch)
        finally:
            gauges.stop()
            (health_result,) = results(health)
        assert not gauges.errors, gauges.errors[:3]
        phases_gauges.append(gauges.values)
        return _Phase(*load, health=health_result)

    baseline = phase(up_port, "direct", lambda: _big_fetch(big_port, direct_big))

    before = _settled(proxy.port)
    files_before = proxy.fd_count() - before["llmobserve_upstream_idle_connections"]
    with RSSSampler(proxy, interval=0.5) as rss:
        proxied = phase(proxy.port, "proxied", lambda: _big_fetch(proxy.port, proxied_big))
    after = _settled(proxy.port)
    files_after = proxy.fd_count() - after["llmobserve_upstream_idle_connections"]
    assert proxy.running, proxy.log_tail()
    return (
        mix,
        baseline,
        proxied,
        (before, after),
        (files_before, files_after),
        rss,
        [g["llmobserve_parse_queue"] for g in phases_gauges[-1]],
    )


def _check_t28(
    mix: Mix,
    baseline: _Phase,
    proxied: _Phase,
    metrics: tuple[dict[str, float], dict[str, float]],
    files: tuple[float, float],
    rss: RSSSampler,
    parse_queue: list[float],
) -> None:
    before, after = metrics
    streams, chat = proxied.streams, proxied.chat

    # nothing failed, nothing cut short
    for result in (baseline.streams, baseline.chat, streams, chat):
        assert result["errors"] == 0 and result["non2xx"] == 0, result
    assert streams["short_streams"] == 0 and streams["unfinished"] == 0, streams
    assert streams["streams_completed"] == streams["requests"] >= STREAMS, streams
    assert chat["completed_total"] == chat["requests"], chat
    expected_big = math.floor(SECONDS * mix.big_per_second / 2)
    for statuses in (baseline.big, proxied.big):
        assert set(statuses) == {200} and len(statuses) >= expected_big, (mix, statuses)

    # latency against the baseline of the same run
    added_chat_p99 = chat["latency_us"]["p99"] - baseline.chat["latency_us"]["p99"]
    allowed = max(mix.chat_p99_floor_us, 2 * baseline.chat["latency_us"]["p99"])
    print(f"T28 chat p99 added {added_chat_p99:.0f} us of {allowed:.0f} allowed")
    assert added_chat_p99 <= allowed, (mix, chat["latency_us"], baseline.chat["latency_us"])
    added_first_event_p99 = (
        streams["first_chunk_us"]["p99"] - baseline.streams["first_chunk_us"]["p99"]
    )
    assert added_first_event_p99 <= mix.first_event_allowance_us, (
        mix,
        streams["first_chunk_us"],
        baseline.streams["first_chunk_us"],
    )
    for health in (baseline.health, proxied.health):
        assert health["errors"] == 0 and health["non2xx"] == 0, health
    loop_p99_ms = proxied.health["latency_us"]["p99"] / 1000
    assert loop_p99_ms < 100, f"/health p99 {loop_p99_ms:.0f} ms under load"

    # one event per request, the parse queue within its cap
    made = streams["requests"] + chat["requests"] + len(proxied.big)
    stored = after["llmobserve_events_total"] - before["llmobserve_events_total"]
    assert stored == made, (stored, made)
    assert after["llmobserve_events_dropped_total"] == 0
    assert max(parse_queue) <= after["llmobserve_parse_queue_limit"], max(parse_queue)

    # no leaks: open files back, memory bounded
    files_before, files_after = files
    assert files_after <= files_before + 5, files
    assert rss.growth_kib < 64 * 1024, f"RSS grew {rss.growth_kib / 1024:.0f} MiB"
    if SECONDS >= SOAK_SECONDS:  # the soak: no steady climb once warm (second half of the run)
        late = rss.samples[len(rss.samples) // 2 :]
        slope = statistics.linear_regression([t for t, _ in late], [k for _, k in late]).slope
        assert slope * 60 / 1024 < 1.0, f"RSS climbs {slope * 60 / 1024:.2f} MiB/min"
