"""Issue 16, through a real proxy: a Batch API results file downloaded through
the proxy is the call that bills the batch, at half price (docs/PRICES.md,
price modifiers), and the event says so in its flags.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import proxy_request, raw_request
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream, Response

pytestmark = pytest.mark.timeout(60)


def _line(custom_id: str, prompt: int, completion: int) -> bytes:
    row = {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_{custom_id}",
            "body": {
                "id": f"chatcmpl-{custom_id}",
                "object": "chat.completion",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
        "error": None,
    }
    return json.dumps(row).encode() + b"\n"


def _events_when_stored(proxy: ProxyProcess) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(proxy.url + "/api/events?limit=10", timeout=5) as response:
            events: list[dict[str, Any]] = json.loads(response.read())["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_batch_results_download_is_priced_at_half(tmp_path: Path) -> None:
    """The client downloads the results file byte for byte; the event prices
    the summed usage of its lines at half, flagged pricing:batch."""
    body = _line("a", 22, 2) + _line("b", 30, 10)
    results = Response(200, [("Content-Type", "application/octet-stream")], body)
    with RecordingUpstream(results) as upstream:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        args += ["--db", str(tmp_path / "events.sqlite3")]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            request = proxy_request(proxy.port, "GET", upstream.url + "/v1/files/file-xyz/content")
            response = raw_request(proxy.port, request)
            assert response.status == 200
            assert response.body == body

            [event] = _events_when_stored(proxy)
    assert event["provider"] == "openai"
    assert event["endpoint"] == "batch.results"
    assert "pricing:batch" in event["flags"]
    assert event["usage"] == {"input_tokens": 52, "output_tokens": 12}
    # gpt-4o-mini: 52 x $0.15/M + 12 x $0.60/M = $15e-6, halved for the batch
    # (genai-prices's own batch prices since 2026-10-14: $0.075 / $0.30, the same)
    assert event["cost_usd"] == pytest.approx(7.5e-6, rel=1e-9)
    assert event["price_ref"].endswith((" x0.5 (batch)", " (batch prices)"))
