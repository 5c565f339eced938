"""C{--workers N}: sibling processes share the port, record events, stop together."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from support.clients import proxy_request, raw_request
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(60)
def test_two_workers_share_the_port_record_every_call_and_stop_on_sigterm(tmp_path: Path) -> None:
    with RecordingUpstream() as upstream:
        proxy = ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--workers",
                "2",
            ],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            pids: set[int] = set()
            deadline = time.monotonic() + 15
            while len(pids) < 2 and time.monotonic() < deadline:
                try:
                    pids.add(json.loads(raw_request(proxy.port, health).body)["pid"])
                except OSError:
                    time.sleep(0.05)  # the sibling may still be starting
            assert len(pids) == 2, pids
            calls = 40
            for _ in range(calls):  # a new connection each: the kernel spreads them
                response = raw_request(
                    proxy.port,
                    proxy_request(
                        proxy.port,
                        "POST",
                        upstream.url + "/v1/chat/completions",
                        [("Content-Type", "application/json"), ("Connection", "close")],
                        b'{"model":"gpt-4o-mini","messages":[]}',
                    ),
                )
                assert response.status == 200
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(timeout=20) == 0, proxy.log_tail()
        sibling = (pids - {proxy.pid}).pop()
        deadline = time.monotonic() + 10
        while _alive(sibling) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(sibling), "the sibling worker outlived the first process"
        db = sqlite3.connect(proxy.home / "events.sqlite3")
        (count,) = db.execute("SELECT count(*) FROM events WHERE kind = 'call'").fetchone()
    assert count == calls
