"""The real collector process: twistd on loopback, a LINK.md client, SIGKILL, restart.

Each test starts C{twistd -n llmobserve-collector} through the suite's one
C{twistd} shim (L{support.proxy.CollectorProcess}: an ephemeral loopback
port read from its start-up line, killed with its test whatever happened).
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

    def start(heartbeat: float = 5.0) -> CollectorProcess:
        collector = CollectorProcess(
            ("--heartbeat", str(heartbeat)),
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
