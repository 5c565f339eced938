"""C{observe(api_key=...)} (or C{LLMOBSERVE_API_KEY}) sends the key as
C{X-LLMObserve-Key} on every routed call, so a proxy that requires keys
forwards the calls and records the key's project; the upstream never sees
the key. Real process: C{twistd llmobserve --require-keys}, its keys in its
own store file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.proxy import LOOPBACK_ARGS, ProxyProcess, loopback_env
from support.upstreams import RecordingUpstream

import llmobserve
from llmobserve.collector import EventStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def untracked() -> Iterator[None]:
    yield
    llmobserve.shutdown()


def test_the_sdk_sends_its_api_key_to_the_proxy(tmp_path: Path, untracked: None) -> None:
    db = tmp_path / "proxy.sqlite3"
    done = subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", "keys", "create", "--db", str(db),
         "--name", "app", "--project", "shop"],
        capture_output=True, text=True, timeout=30, env=loopback_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[-1]
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--require-keys", "--db", str(db)]
        args += ["--provider-host", f"{upstream.authority}=openai"]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            hosts = {upstream.authority: "openai"}
            url = upstream.url + "/v1/chat/completions"
            body = {"model": "gpt-4o-mini", "messages": []}
            llmobserve.observe(proxy_url=proxy.url, provider_hosts=hosts)
            refused = httpx.post(url, json=body, timeout=10)  # no key: the proxy says so
            assert refused.status_code == 401
            assert refused.headers["x-llmobserve-error"] == "unauthorized"
            llmobserve.observe(proxy_url=proxy.url, provider_hosts=hosts, api_key=key)
            response = httpx.post(url, json=body, timeout=10)
            assert response.status_code == 200
            llmobserve.shutdown()
            deadline = time.monotonic() + 10
            events: list[dict[str, object]] = []
            while not events and time.monotonic() < deadline:
                store = EventStore(db)
                try:
                    events = store.events(kind="call")
                finally:
                    store.close()
                time.sleep(0.05)
    assert len(upstream.requests) == 1
    assert upstream.requests[0].header("x-llmobserve-key") is None
    assert [e["project"] for e in events] == ["shop"]
