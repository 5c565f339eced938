"""The real collector process: twistd on loopback, a LINK.md client, SIGKILL, restart.

Each test starts C{twistd -n llmobserve-collector} through the suite's one
C{twistd} shim (L{support.proxy.CollectorProcess}: an ephemeral loopback
port read from its start-up line, killed with its test whatever happened).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest
from support.proxy import CollectorProcess

from llmobserve.events._codec import MAGIC, FrameDecoder, encode_frame


def get(collector: CollectorProcess, path: str) -> Any:
    """The JSON a collector's HTTP API answers on C{path}."""
    with urllib.request.urlopen(collector.url + path, timeout=10) as r:
        return json.loads(r.read())


class LinkClient:
    """A minimal LINK.md client (what a proxy does), blocking, for tests."""

    def __init__(self, port: int, proxy_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = FrameDecoder()
        self.sock.sendall(MAGIC + encode_frame({"t": "hello", "proxy_id": proxy_id, "version": 1}))
        (welcome,) = self.read()
        assert welcome == {"t": "welcome", "version": 1, "server": "llmobserve-collector"}
        self.acked = -1

    def read(self) -> list[dict[str, Any]]:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            messages = self.decoder.feed(data)
            if messages:
                return messages

    def send_batch(self, seq: int, events: list[dict[str, Any]]) -> None:
        self.sock.sendall(encode_frame({"t": "batch", "seq": seq, "events": events}))

    def wait_ack(self, seq: int) -> None:
        while self.acked < seq:
            for m in self.read():
                if m["t"] == "ack":
                    assert m["seq"] > self.acked  # cumulative, in order
                    self.acked = m["seq"]

    def close(self) -> None:
        self.sock.close()


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the peer closes (or resets) the socket within its timeout."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start collectors on one store in C{tmp_path}; all killed at the end."""
    started: list[CollectorProcess] = []

    def start(heartbeat: float = 5.0, args: tuple[str, ...] = ()) -> CollectorProcess:
        collector = CollectorProcess(
            ("--heartbeat", str(heartbeat), *args),
            db=tmp_path / "events.sqlite3",
            workdir=tmp_path,
            start_timeout=20.0,
        )
        started.append(collector)
        return collector.start()

    yield start
    for collector in started:
        collector.kill()


def make_events(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"ev-{i:05d}",
            "kind": "call",
            "ts": 1_750_000_000.0 + i,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "cost_usd": 0.001,
            "usage": {"input_tokens": 10, "output_tokens": 2},
            "context": {"customer_id": f"c{i % 3}"},
        }
        for i in range(n)
    ]


@pytest.mark.timeout(60)
def test_sigkill_restart_resend_exactly_once(spawn: Any) -> None:
    """1,000 events over a link; SIGKILL mid-run; restart; resend; 1,000 distinct ids.

    Acked events survive the kill (acks follow commits); the resend after the
    restart, which overlaps what was already stored, is deduplicated on id.
    """
    events = make_events(1000)
    batches = [(seq, events[seq * 50 : seq * 50 + 50]) for seq in range(20)]
    collector = spawn()
    link = LinkClient(collector.port, "proxy-1")
    for seq, batch in batches[:8]:
        link.send_batch(seq, batch)
    link.wait_ack(7)
    # The rest goes out unacknowledged, and the collector dies under it.
    for seq, batch in batches[8:]:
        link.send_batch(seq, batch)
    collector.send_signal(signal.SIGKILL)
    collector.wait(10)
    link.close()
    acked_before_kill = link.acked
    assert acked_before_kill >= 7

    collector = spawn()
    health = get(collector, "/health")
    assert health["service"] == "llmobserve-collector"
    # everything acked before the kill was committed and survived it
    assert health["events_stored"] >= (acked_before_kill + 1) * 50

    # The proxy resends from its last ack; resend from earlier still to
    # prove duplicates are harmless.
    link = LinkClient(collector.port, "proxy-1")
    for seq, batch in batches[max(0, acked_before_kill - 3) :]:
        link.send_batch(seq, batch)
    link.wait_ack(19)
    link.close()

    body = get(collector, "/api/events?limit=10000")
    ids = [e["id"] for e in body["events"]]
    assert len(ids) == 1000
    assert set(ids) == {e["id"] for e in events}
    assert get(collector, "/health")["events_stored"] == 1000
    report = get(collector, "/api/report?by=customer")
    assert sum(r["calls"] for r in report["rows"]) == 1000


@pytest.mark.timeout(60)
def test_hostile_links_leave_others_alone(spawn: Any) -> None:
    """Garbage, oversized and half-open links are closed alone; HTTP and good links go on."""
    collector = spawn(heartbeat=2.0)
    good = LinkClient(collector.port, "good")

    garbage = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
    garbage.sendall(MAGIC + b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
    oversized = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
    oversized.sendall(MAGIC + b"\xff\xff\xff\xff")
    half_open = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
    half_open.sendall(MAGIC + b"\x00\x00")  # a frame that never finishes
    for s in (garbage, oversized):
        assert closed_by_peer(s)

    good.send_batch(1, make_events(10))
    good.wait_ack(1)
    assert get(collector, "/health")["status"] == "ok"
    assert get(collector, "/health")["events_stored"] == 10
    health = get(collector, "/health")
    assert health["link_protocol_errors"] >= 2
    assert {link["proxy_id"] for link in health["links"]} >= {"good"}
    # the half-open link sent no hello: closed at the first heartbeat
    assert closed_by_peer(half_open)
    good.close()
    assert collector.running


@pytest.mark.timeout(60)
def test_sigterm_drains_and_exits_cleanly(spawn: Any, tmp_path: Path) -> None:
    """SIGTERM stops listening, commits what was received, and shuts down cleanly."""
    collector = spawn()
    link = LinkClient(collector.port, "proxy-t")
    events = make_events(500)
    for seq in range(10):
        link.send_batch(seq, events[seq * 50 : seq * 50 + 50])
    link.wait_ack(9)
    collector.send_signal(signal.SIGTERM)
    # twistd re-raises the stopping signal after a clean shutdown, so the
    # status is -SIGTERM; the clean part is the "Server Shut Down." line.
    assert collector.wait(15) in (0, -15)
    assert "Server Shut Down." in collector.log_text()
    link.close()
    collector = spawn()
    assert get(collector, "/health")["events_stored"] == 500


def _deep_batch(seq: int, depth: int = 800) -> bytes:
    """A batch frame: one ordinary event and one nested C{depth} levels deep.

    Built by hand: msgpack's packer refuses to nest past 511 levels, but its
    unpacker reads this (so a hostile client can send it).
    """

    def pack(value: Any) -> bytes:
        return cast(bytes, msgpack.packb(value))

    deep = (
        b"\x84"
        + pack("id")
        + pack("deep")
        + pack("kind")
        + pack("call")
        + pack("ts")
        + pack(1_750_000_000.0)
        + pack("context")
        + b"\x81"
        + pack("x")
        + b"\x91" * depth
        + b"\x01"
    )
    good = pack({"id": f"poisoned-good-{seq}", "kind": "call", "ts": 1_750_000_000.0})
    body = b"\x83" + pack("t") + pack("batch") + pack("seq") + pack(seq) + pack("events")
    body += b"\x92" + good + deep
    return struct.pack(">I", len(body)) + body


@pytest.mark.timeout(90)
def test_poisoned_event_does_not_reset_an_innocent_link(spawn: Any) -> None:
    """A hostile proxy resends a batch with an event nested 800 levels deep
    while an innocent proxy sends 2,000 events: the bad event is stored once
    as a rejected record and acked, the innocent link is never reset and all
    its events are stored, and the log holds a few lines, not one per resend
    (it was: RecursionError rolled back the shared commit, the innocent link
    was reset, and tracebacks filled the log)."""
    collector = spawn(heartbeat=30.0)
    innocent = LinkClient(collector.port, "innocent")
    events = make_events(2000)
    stop = threading.Event()
    resends: list[int] = []
    resets: list[int] = []

    def hostile() -> None:
        seq = 0
        client = LinkClient(collector.port, "hostile")
        while not stop.is_set() and seq < 200:
            seq += 1
            try:
                client.sock.sendall(_deep_batch(seq))
                client.wait_ack(seq)
                resends.append(seq)
            except OSError:  # reset by the collector: reconnect, resend
                resets.append(seq)
                client.close()
                client = LinkClient(collector.port, "hostile")
        client.close()

    thread = threading.Thread(target=hostile, daemon=True)
    thread.start()
    try:
        for seq in range(40):
            innocent.send_batch(seq, events[seq * 50 : seq * 50 + 50])
            time.sleep(0.01)
        innocent.wait_ack(39)
    finally:
        stop.set()
        thread.join(30)
    innocent.close()
    assert resets == [] and len(resends) >= 10

    stored = get(collector, "/api/events?kind=call&limit=10000")["events"]
    ids = {e["id"] for e in stored}
    assert {e["id"] for e in events} <= ids
    assert {f"poisoned-good-{s}" for s in resends} <= ids
    (rejected,) = get(collector, "/api/events?kind=rejected")["events"]
    assert rejected["id"] == "deep" and "deeper than 64 levels" in rejected["reason"]
    health = get(collector, "/health")
    assert health["events_rejected"] == len(resends)
    log = collector.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert log.count("cannot be stored") <= 5
    print(
        f"innocent: sent 2000, stored {len(ids & {e['id'] for e in events})}; "
        f"hostile: {len(resends)} resends, 1 rejected record, "
        f"{health['events_rejected']} rejections counted, "
        f"{log.count('cannot be stored')} log lines, resets {len(resets)}"
    )


@pytest.mark.timeout(120)
def test_partial_frames_of_many_links_are_capped(spawn: Any) -> None:
    """20 links each send 8 MiB minus 1 KiB of an 8 MiB frame (160 MiB in
    all) against a 32 MiB cap: the collector's RSS grows by less than 80 MiB
    (it held every byte, 160 MiB and more, until the links' deadlines), the
    links past the cap are closed with a logged reason, and a good link is
    served all along."""
    cap = 32 * 1024 * 1024
    collector = spawn(heartbeat=30.0, args=("--max-partial-bytes", str(cap)))
    good = LinkClient(collector.port, "good")
    good.send_batch(0, make_events(10))
    good.wait_ack(0)
    before = collector.rss_kib()
    frame = 8 * 1024 * 1024
    body = b"\x00" * (frame - 1024)
    hostile: list[socket.socket] = []
    refused = 0
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
        hostile.append(s)
        hello = encode_frame({"t": "hello", "proxy_id": f"hog-{i}", "version": 1})
        try:
            s.sendall(MAGIC + hello + struct.pack(">I", frame) + body)
        except OSError:
            refused += 1
    health = get(collector, "/health")
    peak = collector.peak_rss_kib()
    good.send_batch(1, make_events(20)[10:])
    good.wait_ack(1)
    growth_mib = (peak - before) / 1024
    print(
        f"RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
        f"(+{growth_mib:.0f}); refused {health.get('links_refused_for_memory')}; "
        f"held {health.get('partial_frame_bytes')} bytes"
    )
    assert health["partial_frame_bytes"] <= cap
    assert health["links_refused_for_memory"] >= 16
    assert growth_mib < 80
    for s in hostile:
        s.close()
    deadline = time.monotonic() + 10
    while get(collector, "/health")["partial_frame_bytes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(collector, "/health")["partial_frame_bytes"] == 0
    good.close()
    assert "refused, closing: incomplete frames of all links" in collector.log_text()
    assert get(collector, "/health")["events_stored"] == 20


@pytest.mark.timeout(60)
def test_bytes_before_hello_are_capped(spawn: Any) -> None:
    """A connection that says no hello may not hold more than 64 KiB: it is
    closed at once, not at the hello deadline."""
    collector = spawn(heartbeat=30.0)
    s = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
    s.sendall(MAGIC + struct.pack(">I", 1 << 20) + b"\x00" * (128 * 1024))
    assert closed_by_peer(s)
    assert get(collector, "/health")["links_refused_for_memory"] == 1


_BAD_TIMES = [
    "/api/report?since=" + "9" * 400 + "s",
    "/api/report?until=" + "9" * 400 + "h",
    "/api/report?since=1e308",
    "/api/report?since=-1e308",
    "/api/events?until=1e308",
]


def _status_and_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(60)
def test_bad_time_parameters_are_400_on_collector_and_embedded_proxy(
    spawn: Any, tmp_path: Path
) -> None:
    """The trial's 500s, against the real processes: the collector's C{/api}
    and C{/dashboard}, and an embedded proxy's own C{/api} (the same
    resources), answer each with a 400 and the error contract."""
    from support.proxy import LOOPBACK_ARGS, ProxyProcess

    collector = spawn()
    base = f"http://127.0.0.1:{collector.port}"
    dashboard = ["/dashboard?since=1e308", "/dashboard?until=-1e308"]
    args = [*LOOPBACK_ARGS, "--db", str(tmp_path / "proxy.sqlite3")]
    with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
        # the proxy serves /api, not the dashboard
        urls = [base + p for p in _BAD_TIMES + dashboard] + [proxy.url + p for p in _BAD_TIMES]
        for url in urls:
            status, body = _status_and_json(url)
            assert status == 400, (url, body)
            assert body["error"]["type"] == "bad_request", (url, body)


_STOP_LINE = re.compile(
    r"llmobserve collector stopped: (\d+) events? stored, (\d+) duplicates? ignored, "
    r"(\d+) links? served; up \d+ s"
)


def _stop_line(collector: CollectorProcess) -> tuple[int, int, int]:
    """SIGTERM C{collector}, wait for it, and read its stop line's counts."""
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(15) in (0, -15)
    match = _STOP_LINE.search(collector.log_text())
    assert match is not None, collector.log_tail()
    stored, duplicates, links = match.groups()
    return int(stored), int(duplicates), int(links)


@pytest.mark.timeout(60)
def test_a_stopped_collector_says_what_this_run_did(spawn: Any) -> None:
    """On SIGTERM the collector logs one line: events stored this run (not
    the store's total), duplicates ignored, links served, uptime. Two links,
    the second resending a batch the first stored; then a second run on the
    same store stores 10 new events of 60 received."""
    events = make_events(510)
    collector = spawn()
    first = LinkClient(collector.port, "proxy-a")
    for seq in range(10):
        first.send_batch(seq, events[seq * 50 : seq * 50 + 50])
    first.wait_ack(9)
    second = LinkClient(collector.port, "proxy-b")
    second.send_batch(0, events[:50])
    second.wait_ack(0)
    assert _stop_line(collector) == (500, 50, 2)
    first.close()
    second.close()

    collector = spawn()
    again = LinkClient(collector.port, "proxy-a")
    again.send_batch(10, events[450:510])
    again.wait_ack(10)
    assert _stop_line(collector) == (10, 50, 1)
    again.close()
