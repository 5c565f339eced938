"""The proxy's own clients need a key when it requires keys (DESIGN.md,
"A shared deployment"): C{X-LLMObserve-Key}, consumed and never forwarded.

Real processes: C{twistd llmobserve --require-keys} (what listening beyond
loopback implies) in embedded mode, its keys in its own store file (made
with C{llmobserve keys create --db}), and in collector mode, its clients'
keys checked by the collector (C{/api/whoami}). A call without a valid key
is answered 401 C{unauthorized} (error contract) and never reaches the
upstream; a valid key's project is the event's C{project}.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_request, raw_request
from support.commands import llmobserve, new_key
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordingUpstream


def _json(url: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _call(proxy: ProxyProcess, upstream: RecordingUpstream, key: str | None) -> Any:
    request = chat_request(proxy.port, upstream.url)
    if key is not None:
        head, sep, rest = request.partition(b"\r\n")
        request = head + sep + b"X-LLMObserve-Key: " + key.encode() + b"\r\n" + rest
    return raw_request(proxy.port, request)


def _proxy(tmp_path: Path, upstream: RecordingUpstream, *args: str) -> ProxyProcess:
    return ProxyProcess(
        [
            *LOOPBACK_ARGS,
            "--require-keys",
            "--provider-host",
            f"127.0.0.1:{upstream.port}=openai",
            *args,
        ],
        workdir=tmp_path / "proxy",
    )


@pytest.mark.timeout(120)
def test_an_embedded_proxy_forwards_only_calls_with_a_valid_key(tmp_path: Path) -> None:
    """No key, a wrong key, a read key: 401 C{unauthorized} with the error
    contract, nothing forwarded. An ingest key: forwarded without the
    header, the event carries its project; the proxy's own /api answers a
    read key its project's events only, an admin key all. Revoked with C{keys revoke --db}
    while the proxy runs: refused within seconds."""
    db = tmp_path / "proxy.sqlite3"
    good = new_key("--name", "app", "--project", "shop", "--db", str(db))
    read = new_key("--name", "reader", "--scope", "read", "--db", str(db))
    shop_read = new_key(
        "--name", "shop-reader", "--project", "shop", "--scope", "read", "--db", str(db)
    )  # fmt: skip
    other = new_key("--name", "other", "--project", "other", "--scope", "read", "--db", str(db))
    admin = new_key("--name", "admin", "--scope", "admin", "--db", str(db))
    with RecordingUpstream() as upstream, _proxy(tmp_path, upstream, "--db", str(db)) as proxy:
        for key in (None, "llmo_" + "w" * 43, read):
            response = _call(proxy, upstream, key)
            assert response.status == 401, response.body
            assert response.header("x-llmobserve-error") == b"unauthorized"
            assert json.loads(response.body)["error"]["type"] == "unauthorized"
        assert upstream.requests == []
        # refused calls are not events (no client key, no write to the
        # store), but the log and /metrics say so
        with urllib.request.urlopen(proxy.url + "/metrics", timeout=5) as metrics:
            counted = [
                line
                for line in metrics.read().decode().splitlines()
                if line.startswith("llmobserve_requests_key_refused_total ")
            ]
        assert counted == ["llmobserve_requests_key_refused_total 3.0"]
        _wait_for(
            lambda: "-> 401 unauthorized (client key), not forwarded" in proxy.log_text(),
            5,
            "the refusal's log line",
        )
        for _ in range(3):
            assert _call(proxy, upstream, good).status == 200
        assert len(upstream.requests) == 3
        assert all(r.header("x-llmobserve-key") is None for r in upstream.requests)
        _wait_for(
            lambda: len(_json(proxy.url + "/api/events?kind=call", admin)["events"]) == 3,
            10,
            "the events",
        )
        events = _json(proxy.url + "/api/events?kind=call", admin)["events"]
        assert {e["project"] for e in events} == {"shop"}
        # the proxy's own /api: a read key sees its project only, no key nothing
        assert _json(proxy.url + "/api/events?kind=call&project=shop", other)["events"] == []
        assert len(_json(proxy.url + "/api/events?kind=call", read)["events"]) == 0
        assert len(_json(proxy.url + "/api/events?kind=call", shop_read)["events"]) == 3
        for key in (None, "llmo_" + "w" * 43, good):
            request = urllib.request.Request(
                proxy.url + "/api/report",
                headers={"Authorization": f"Bearer {key}"} if key else {},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            assert refused.value.code == (403 if key == good else 401)
        # the SDK's spans become events too: the same key as the calls
        for key, status in ((None, 401), (read, 401), (good, 202)):
            span = json.dumps([{"span_id": f"s-{status}", "section": "plan", "ts": 1.0}])
            request = urllib.request.Request(
                proxy.url + "/spans",
                data=span.encode(),
                headers={"Content-Type": "application/json"}
                | ({"X-LLMObserve-Key": key} if key else {}),
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as answered:
                    got = answered.status
            except urllib.error.HTTPError as refused_span:
                got = refused_span.code
            assert got == status, (key, got)
        assert llmobserve("keys", "revoke", "app", "--db", str(db)).returncode == 0
        _wait_for(lambda: _call(proxy, upstream, good).status == 401, 10, "the revoked key refused")
        log = proxy.log_text()
    assert not any(k in log for k in (good, read))
    assert "client keys required: calls and POST /spans need an ingest key" in log


@pytest.mark.timeout(120)
def test_a_linked_proxy_asks_the_collector_about_its_clients_keys(tmp_path: Path) -> None:
    """In collector mode the collector checks the client's key; the proxy
    links with an admin key (it serves several projects), so each call's
    event keeps its client key's project."""
    db = tmp_path / "collector.db"
    link = new_key("--name", "proxy", "--scope", "admin", "--db", str(db))
    shop = new_key("--name", "shop-app", "--project", "shop", "--db", str(db))
    blog = new_key("--name", "blog-app", "--project", "blog", "--db", str(db))
    collector = CollectorProcess(["--require-keys"], db=db, workdir=tmp_path / "collector")
    with RecordingUpstream() as upstream, collector:
        args = ("--collector", collector.url, "--collector-key", link)
        with _proxy(tmp_path, upstream, *args) as proxy:
            assert _call(proxy, upstream, None).status == 401
            assert _call(proxy, upstream, "llmo_" + "v" * 43).status == 401
            assert _call(proxy, upstream, shop).status == 200
            assert _call(proxy, upstream, blog).status == 200
            assert _call(proxy, upstream, blog).status == 200
            _wait_for(
                lambda: _json(collector.url + "/health")["events_stored"] == 3,
                20,
                "the events at the collector",
            )
        rows = _json(collector.url + "/api/report?by=project", link)["rows"]
    assert sorted((r["project"], r["calls"]) for r in rows) == [("blog", 2), ("shop", 1)]
    assert len(upstream.requests) == 3
