"""Issue 13's never-lost losses, each reproduced with a real proxy process.

A full disk (a tiny tmpfs), the store and spool removed under a running
proxy, two proxies sharing a spool directory: for each, every call sent is
either stored or counted in a gap record, and C{/health} says what is wrong
while it is wrong.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_request, raw_request
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.tmpfs import fill, small_tmpfs, unfill
from support.upstreams import RecordingUpstream


def _health(proxy: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(proxy.url + "/health", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _calls(proxy: ProxyProcess, upstream_url: str, n: int) -> int:
    """Make C{n} chat calls one at a time; return how many answered 200."""
    ok = 0
    for _ in range(n):
        if raw_request(proxy.port, chat_request(proxy.port, upstream_url)).status == 200:
            ok += 1
    return ok


def _stop(proxy: ProxyProcess) -> None:
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=20) == 0, proxy.log_tail()


def _calls_and_gaps(db: Path) -> tuple[int, int]:
    """(call events stored, events counted in gap records) in C{db}."""
    conn = sqlite3.connect(db)
    try:
        calls = conn.execute("SELECT count(*) FROM events WHERE kind = 'call'").fetchone()[0]
        gaps = conn.execute(
            "SELECT coalesce(sum(dropped), 0) FROM events WHERE kind = 'gap'"
        ).fetchone()[0]
    finally:
        conn.close()
    return int(calls), int(gaps)


@pytest.mark.timeout(90)
def test_a_full_disk_degrades_health_keeps_traffic_and_counts_every_lost_event(
    tmp_path: Path,
) -> None:
    """Issue 13 item 4 (embedded mode, spool and store on a 3 MiB tmpfs that
    fills up): every call is still forwarded, the proxy holds no more
    descriptors than before, C{/health} says C{degraded} with the reason
    while the disk is full and C{ok} again once there is room; every call
    is then either stored or counted in a gap record."""
    with small_tmpfs(tmp_path / "disk", kib=3072) as disk, RecordingUpstream() as upstream:
        db = disk / "events.sqlite3"
        proxy = ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--db",
                str(db),
                "--spool-dir",
                str(disk / "spool"),
            ],
            workdir=tmp_path / "proxy",
        )
        with proxy:
            sent = ok = _calls(proxy, upstream.url, 20)
            _wait_for(lambda: _health(proxy)["events_waiting"] == 0, 10, "the first calls stored")
            assert _health(proxy)["status"] == "ok"
            fds = proxy.fd_count()
            fill(disk)
            sent += 300
            ok += _calls(proxy, upstream.url, 300)
            assert ok == sent, "observation broke traffic"
            health = _health(proxy)
            assert health["status"] == "degraded", health
            assert any("No space left" in reason for reason in health["degraded"]), health
            assert proxy.fd_count() <= fds + 4, "descriptors leaked while the disk was full"
            unfill(disk)
            sent += 20
            ok += _calls(proxy, upstream.url, 20)
            _wait_for(
                lambda: _health(proxy)["status"] == "ok" and _health(proxy)["events_waiting"] == 0,
                20,
                "health back to ok with everything stored",
            )
            assert ok == sent
            _stop(proxy)
        calls, gaps = _calls_and_gaps(db)
    assert gaps > 0, "nothing was counted while the disk was full"
    print(f"full disk: sent={sent} stored={calls} gaps={gaps}")
    assert calls + gaps == sent, (calls, gaps, sent)
