"""A proxy naming two collectors: /health says which one it delivers to.

C{--collector} is repeatable (C{llmobserve.proxy._rotate}): after a failed
attempt the link tries the next collector. C{/health}'s C{collector.url}
is the collector in use, and C{collector.urls} lists them all, so whoever
reads it after a failover sees the second collector, not the first.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_calls
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordingUpstream


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


def _stored_calls(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM events WHERE kind = 'call'").fetchone()
    return int(n)


@pytest.mark.timeout(60)
def test_health_names_the_collector_in_use_after_a_failover(tmp_path: Path) -> None:
    """Two collectors, the first SIGKILLed: the proxy moves to the second,
    and /health's collector.url says so (state connected), with both in
    collector.urls; the call made after the kill is stored by the second."""
    first = CollectorProcess(workdir=tmp_path / "first")
    second = CollectorProcess(workdir=tmp_path / "second")
    with RecordingUpstream() as upstream, first, second:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        args += ["--collector", first.url, "--collector", second.url]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            health = proxy.url + "/health"
            _wait_for(
                lambda: _get_json(health)["collector"]["state"] == "connected",
                20,
                "the link to the first collector",
            )
            collector = _get_json(health)["collector"]
            assert collector["url"] == first.url
            assert collector["urls"] == [first.url, second.url]

            first.kill()
            chat_calls(proxy.port, upstream.url, 1)
            _wait_for(
                lambda: (
                    _get_json(health)["collector"]
                    == {**collector, "url": second.url, "state": "connected"}
                ),
                30,
                "the link to move to the second collector",
            )
            _wait_for(lambda: _get_json(health)["events_waiting"] == 0, 20, "the ack")
            assert _stored_calls(Path(second.db)) == 1
