"""The proxy's own refusals in the events and in C{llmobserve report}, real processes.

Issue 14, item 12: a 403 policy refusal and a 502 for a name with no
address went nowhere upstream, yet read as calls of provider C{unknown},
unpriced, flagged C{upstream_error_status}. They are recorded with their
own outcomes (C{refused}, C{proxy_error}) and the report counts them on a
line of their own.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import proxy_request, raw_request
from support.fakedns import FakeDNS
from support.proxy import ProxyProcess
from support.upstreams import RecordingUpstream

from llmobserve.cli import main
from llmobserve.collector._store import EventStore

pytestmark = pytest.mark.timeout(60)

ProxyFactory = Callable[..., ProxyProcess]


def _calls(db: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if db.exists():
            store = EventStore(db)
            try:
                found = store.events(limit=None, kind="call")
            finally:
                store.close()
            if len(found) >= n:
                return found
        time.sleep(0.05)
    raise AssertionError(f"{len(found)} of {n} call events")


def _report(db: Path, *args: str) -> str:
    out = io.StringIO()
    assert main(["report", "--db", str(db), *args], out=out) == 0
    return out.getvalue()


def test_refusals_have_their_own_outcome_and_report_line(
    proxy_factory: ProxyFactory, recording_upstream: RecordingUpstream
) -> None:
    """One forwarded call, one policy refusal (loopback not admitted), one name the
    DNS server does not know: two events that are not calls of provider C{unknown}."""
    with FakeDNS({}) as names:
        proxy = proxy_factory(
            "--provider-host",
            f"{recording_upstream.authority}=openai",
            "--dns-server",
            names.server,
        )
        statuses = []
        for target in (
            f"{recording_upstream.url}/v1/chat/completions",
            "http://127.0.0.1:9/v1/chat/completions",
            "http://nowhere.test:9/v1/chat/completions",
        ):
            data = proxy_request(proxy.port, "POST", target, [], b"{}")
            statuses.append(raw_request(proxy.port, data, method="POST", timeout=10).status)
        assert statuses == [200, 403, 502]
        db = proxy.home / "events.sqlite3"
        events = {e["status"]: e for e in _calls(db, 3)}

    assert events[200]["outcome"] == "ok" and events[200]["provider"] == "openai"
    assert events[403]["outcome"] == "refused"
    assert events[502]["outcome"] == "proxy_error"
    for status in (403, 502):
        assert "upstream_error_status" not in events[status]["flags"]

    text = _report(db)
    assert "unknown" not in text
    assert text.splitlines()[-1] == (
        "refused: 2 calls not forwarded (refused 1, proxy_error 1), not counted above"
    )
    doc = json.loads(_report(db, "--format", "json"))
    assert [r["calls"] for r in doc["rows"]] == [1]
    assert doc["refused"] == {"refused": 1, "proxy_error": 1, "budget_refused": 0}
