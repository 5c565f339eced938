"""An embedded proxy serves its own events and report, as a collector does.

DESIGN.md: with no collector the proxy stores events itself "and serves the
same report": C{GET /api/events} and C{GET /api/report} on the proxy's port,
so C{llmobserve report --collector http://127.0.0.1:9000} works against the
proxy that C{make run} starts. A proxy that sends its events to a collector
keeps no store and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_calls
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream, closed_port

pytestmark = pytest.mark.timeout(60)


def _get(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _report_when_stored(proxy: ProxyProcess, calls: int) -> list[dict[str, Any]]:
    """The rows of C{/api/report?by=provider} once C{calls} calls are stored
    (they are parsed and written a few milliseconds after they are answered)."""
    deadline = time.monotonic() + 10
    while True:
        status, _, report = _get(proxy.url + "/api/report?by=provider")
        assert status == 200
        if sum(r["calls"] for r in report["rows"]) >= calls or time.monotonic() > deadline:
            rows: list[dict[str, Any]] = report["rows"]
            return rows
        time.sleep(0.05)


def test_the_embedded_store_answers_api_report_events_and_the_cli(tmp_path: Path) -> None:
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        args += ["--db", str(tmp_path / "events.sqlite3")]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            chat_calls(proxy.port, upstream.url, 3)

            rows = _report_when_stored(proxy, 3)
            assert [(r["provider"], r["calls"]) for r in rows] == [("openai", 3)]

            status, _, page = _get(proxy.url + "/api/events?limit=2")
            assert status == 200
            assert page["count"] == 2 and page["limit"] == 2
            assert {e["provider"] for e in page["events"]} == {"openai"}

            status, _, error = _get(proxy.url + "/api/report?since=garbage")
            assert status == 400 and error["error"]["type"] == "bad_request"

            command = [sys.executable, "-m", "llmobserve.cli", "report"]
            command += ["--collector", proxy.url, "--by", "provider", "--format", "json"]
            cli = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert cli.returncode == 0, cli.stderr
            rows = json.loads(cli.stdout)["rows"]
            assert [(r["provider"], r["calls"]) for r in rows] == [("openai", 3)]


def test_the_api_answers_get_only_and_unknown_paths_with_json_errors(tmp_path: Path) -> None:
    with ProxyProcess([*LOOPBACK_ARGS], workdir=tmp_path / "proxy") as proxy:
        request = urllib.request.Request(proxy.url + "/api/report", method="POST", data=b"{}")
        try:
            urllib.request.urlopen(request, timeout=5)
            raise AssertionError("POST /api/report was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 405
            assert e.headers["X-LLMObserve-Error"] == "method_not_allowed"
        status, _, error = _get(proxy.url + "/api/nothing-here")
        assert status == 404 and error["error"]["type"] == "not_found"


def test_a_proxy_with_a_collector_keeps_no_store_and_says_so(tmp_path: Path) -> None:
    args = [*LOOPBACK_ARGS, "--collector", f"http://127.0.0.1:{closed_port()}"]
    with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
        status, headers, error = _get(proxy.url + "/api/report")
        assert status == 404
        assert headers["X-LLMObserve-Error"] == "not_found"
        assert "collector" in error["error"]["message"]
