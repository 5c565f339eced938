"""The collector's access log leaves out what its proxies ask on their own.

A proxy linked to a collector reads C{GET /api/budgets} and C{GET
/api/limits} and takes grants (C{POST /api/budgets/grants}) every second
whether or not any budget is defined: each was one access-log line, so a
collector with ten proxies wrote 864,000 lines a day. Those polls are not
logged when they succeed; any other request (and a poll that failed) is,
as before.
"""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.clients import chat_request, raw_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordedRequest, RecordingUpstream, Response, json_response

from llmobserve.cli import main as cli

pytestmark = [pytest.mark.timeout(120)]


def test_the_proxies_polls_are_not_in_the_access_log(tmp_path: Path) -> None:
    def completion(_: RecordedRequest) -> Response:
        return json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    with (
        CollectorProcess(workdir=tmp_path / "c") as collector,
        RecordingUpstream(completion) as upstream,
    ):
        args = ["--name", "cap", "--limit-usd", "5", "--window", "day", "--collector"]
        assert cli(["budgets", "set", *args, collector.url], io.StringIO()) == 0
        proxy_args = [
            *LOOPBACK_ARGS,
            "--provider-host",
            f"{upstream.authority}=openai",
            "--collector",
            collector.url,
        ]
        with ProxyProcess(proxy_args, workdir=tmp_path / "p") as proxy:
            # a call that carries the budget's remaining share: the proxy has
            # read /api/budgets and taken a grant by then
            deadline = time.monotonic() + 30
            while True:
                response = raw_request(proxy.port, chat_request(proxy.port, upstream.url))
                if response.header("X-LLMObserve-Budget-Remaining") is not None:
                    break
                assert time.monotonic() < deadline, "no budget applied within 30 s"
                time.sleep(0.2)
            with urllib.request.urlopen(f"{collector.url}/api/report", timeout=10) as r:
                assert r.status == 200
        log = collector.log_text()
    # other requests are logged, the budget's definition included
    assert '"POST /api/budgets HTTP/1.1" 200' in log
    assert '"GET /api/report HTTP/1.1" 200' in log
    assert "GET /api/budgets" not in log
    assert "GET /api/limits" not in log
    assert "/api/budgets/grants" not in log


def test_failed_polls_are_logged_a_few_times_a_minute(tmp_path: Path) -> None:
    """A proxy with a wrong key fails its polls for as long as it runs:
    the first few failures of a minute are logged, the rest counted."""
    with CollectorProcess(["--require-keys"], workdir=tmp_path / "c") as collector:
        for _ in range(20):
            request = urllib.request.Request(
                f"{collector.url}/api/budgets",
                headers={"Authorization": "Bearer llmo_not_a_key"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401
        with urllib.request.urlopen(f"{collector.url}/health", timeout=10) as r:
            assert r.status == 200
        deadline = time.monotonic() + 10
        while '"GET /health HTTP/1.1" 200' not in collector.log_text():
            assert time.monotonic() < deadline, "the access log did not show /health"
            time.sleep(0.1)
        log = collector.log_text()
    assert log.count('"GET /api/budgets HTTP/1.1" 401') == 5
