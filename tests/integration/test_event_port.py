"""An upstream on a port other than its scheme's: the event names the port.

DESIGN.md's C{host} is the target's name (reports group and filter on it),
so it stays without the port; a port other than 80 for http and 443 for
https travels as the event's C{port} field, through the store and out of
C{llmobserve events --format jsonl}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_calls
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream


def _events_when_stored(proxy: ProxyProcess) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(proxy.url + "/api/events?limit=10", timeout=5) as response:
            events: list[dict[str, Any]] = json.loads(response.read())["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_non_default_port_is_kept_beside_the_host(tmp_path: Path) -> None:
    """A chat call to 127.0.0.1:PORT over http: the stored event has
    host 127.0.0.1 (as before) and port PORT, read back over the API and
    from the command line."""
    db = tmp_path / "events.sqlite3"
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        with ProxyProcess([*args, "--db", str(db)], workdir=tmp_path / "proxy") as proxy:
            chat_calls(proxy.port, upstream.url, 1)
            [event] = _events_when_stored(proxy)
    assert upstream.port not in (80, 443)
    assert (event["host"], event["port"]) == ("127.0.0.1", upstream.port)
    out = subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", "events", "--format", "jsonl", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    [line] = [json.loads(text) for text in out.stdout.splitlines() if text.strip()]
    assert (line["host"], line["port"]) == ("127.0.0.1", upstream.port), out.stderr
