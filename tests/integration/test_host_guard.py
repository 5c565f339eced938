"""Every route of the real proxy and the real collector passes one Host guard.

DESIGN.md, "A shared deployment": before routing, a request's C{Host} must
be an IP literal, C{localhost}, or a name given with C{--public-name NAME}.
A foreign C{Host} (browser DNS rebinding) gets 403 C{host_not_allowed} with
the error contract on every route, including C{/health}, C{/metrics},
C{/api/*}, C{/spans} and the dashboard; nothing goes upstream and nothing
is stored. The same routes answer as usual under a public name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from support.clients import TARGET_HEADER, RawResponse, build_request, raw_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(60)

PUBLIC = "llmobserve"
FOREIGN = ["evil.example:{P}", "evil.example", "llmobserve.evil.example:{P}", "localhost.evil:{P}"]
SERVED = ["llmobserve:{P}", "LLMOBSERVE", "[::1]:{P}", "localhost:{P}", "127.0.0.1:{P}"]
_CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
_SPANS = b'[{"name":"agent:step","span_id":"s1","start":1.0,"end":2.0}]'

# (method, path, extra headers, body); {U} is the fake upstream's URL.
Route = tuple[str, str, list[tuple[str, str]], bytes | None]
PROXY_ROUTES: dict[str, Route] = {
    "health": ("GET", "/health", [], None),
    "health-head": ("HEAD", "/health", [], None),
    "metrics": ("GET", "/metrics", [], None),
    "api-events": ("GET", "/api/events", [], None),
    "api-report": ("GET", "/api/report?by=provider", [], None),
    "api-root": ("GET", "/api", [], None),
    "spans": ("POST", "/spans", [("Content-Type", "application/json")], _SPANS),
    "proxy": (
        "POST",
        "/proxy",
        [(TARGET_HEADER, "{U}/v1/chat/completions"), ("Content-Type", "application/json")],
        _CHAT,
    ),
    "base-url": (
        "POST",
        "/openai/v1/chat/completions",
        [("Content-Type", "application/json")],
        _CHAT,
    ),
    "root": ("GET", "/", [], None),
    "dashboard": ("GET", "/dashboard", [], None),
    "unknown": ("GET", "/no/such/route", [], None),
    "preflight": ("OPTIONS", "/proxy", [("Origin", "https://evil.example")], None),
}
COLLECTOR_ROUTES: dict[str, Route] = {
    "index": ("GET", "/", [], None),
    "health": ("GET", "/health", [], None),
    "health-head": ("HEAD", "/health", [], None),
    "api-events": ("GET", "/api/events", [], None),
    "api-report": ("GET", "/api/report?by=provider", [], None),
    "api-post": ("POST", "/api/events", [("Content-Type", "application/json")], b"{}"),
    "dashboard": ("GET", "/dashboard", [], None),
    "unknown": ("GET", "/no/such/route", [], None),
}


def _send(port: int, route: Route, host: str, upstream_url: str = "") -> RawResponse:
    method, path, headers, body = route
    headers = [(n, v.replace("{U}", upstream_url)) for n, v in headers]
    data = build_request(method, path, headers, body, host=host.replace("{P}", str(port)))
    return raw_request(port, data, method=method, timeout=10)


def _assert_refused(resp: RawResponse, what: str) -> None:
    assert resp.status == 403, (what, resp.status, resp.body[:200])
    assert resp.header("x-llmobserve-error") == b"host_not_allowed", (what, resp.headers)
    if resp.body:  # HEAD has none
        assert resp.json()["error"]["type"] == "host_not_allowed", (what, resp.body[:200])


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


def _proxy_args(upstream: RecordingUpstream, db: Path, *extra: str) -> list[str]:
    return [
        *LOOPBACK_ARGS,
        "--provider-host",
        f"127.0.0.1:{upstream.port}=openai",
        "--base-url",
        f"openai={upstream.url}",
        "--db",
        str(db),
        *extra,
    ]


@pytest.fixture(scope="module")
def named_proxy(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: RecordingUpstream,
) -> Iterator[ProxyProcess]:
    """An embedded-store proxy started with --public-name llmobserve."""
    workdir = tmp_path_factory.mktemp("named-proxy")
    args = _proxy_args(upstream, workdir / "events.sqlite3", "--public-name", PUBLIC)
    proc = ProxyProcess(args, workdir=workdir).start()
    try:
        yield proc
    finally:
        proc.terminate(5.0)


@pytest.fixture(scope="module")
def named_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A collector started with --public-name llmobserve."""
    workdir = tmp_path_factory.mktemp("named-collector")
    proc = CollectorProcess(["--public-name", PUBLIC], workdir=workdir).start()
    try:
        yield proc
    finally:
        proc.terminate(5.0)


@pytest.mark.parametrize("host", FOREIGN)
@pytest.mark.parametrize("route", PROXY_ROUTES)
def test_proxy_refuses_a_foreign_host_on_every_route(
    named_proxy: ProxyProcess, upstream: RecordingUpstream, route: str, host: str
) -> None:
    """Every proxy route, own or forwarding, answers a foreign Host with 403
    host_not_allowed (error contract) and sends nothing upstream."""
    before = upstream.connection_count
    resp = _send(named_proxy.port, PROXY_ROUTES[route], host, upstream.url)
    _assert_refused(resp, f"{route} {host}")
    assert upstream.connection_count == before


@pytest.mark.parametrize("host", SERVED)
@pytest.mark.parametrize("route", PROXY_ROUTES)
def test_proxy_serves_its_public_name_and_ip_literals(
    named_proxy: ProxyProcess, upstream: RecordingUpstream, route: str, host: str
) -> None:
    """Under --public-name llmobserve, Host llmobserve[:PORT] (any case), an IPv6
    or IPv4 literal and localhost get exactly the answer 127.0.0.1 gets."""
    reference = _send(named_proxy.port, PROXY_ROUTES[route], "127.0.0.1:{P}", upstream.url)
    resp = _send(named_proxy.port, PROXY_ROUTES[route], host, upstream.url)
    assert resp.header("x-llmobserve-error") != b"host_not_allowed", (route, host, resp.body)
    assert resp.status == reference.status, (route, host, resp.status, resp.body[:200])


def _stored(proxy: ProxyProcess) -> list[dict[str, Any]]:
    resp = _send(proxy.port, ("GET", "/api/events?limit=100", [], None), "127.0.0.1:{P}")
    assert resp.status == 200, resp.body[:200]
    return cast(list[dict[str, Any]], resp.json()["events"])


def test_refused_calls_and_spans_are_never_stored(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """A foreign Host's calls and spans leave no event: after the whole walk
    (and a name that only --public-name would admit), the store holds exactly
    what one admitted call and one admitted span batch produced."""
    args = _proxy_args(upstream, tmp_path / "events.sqlite3")
    with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
        before = upstream.connection_count
        for host in [*FOREIGN, "llmobserve:{P}"]:
            for name, route in PROXY_ROUTES.items():
                _assert_refused(_send(proxy.port, route, host, upstream.url), f"{name} {host}")
        assert upstream.connection_count == before
        for name in ("proxy", "spans"):
            assert _send(proxy.port, PROXY_ROUTES[name], "127.0.0.1:{P}", upstream.url).status < 300
        deadline = time.monotonic() + 10
        while len(events := _stored(proxy)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything refused but written late would show up by now
        kinds = sorted(str(e.get("kind")) for e in _stored(proxy))
        assert kinds == ["call", "span"], json.dumps(events)[:500]


@pytest.mark.parametrize("host", FOREIGN)
@pytest.mark.parametrize("route", COLLECTOR_ROUTES)
def test_collector_refuses_a_foreign_host_on_every_route(
    named_collector: CollectorProcess, route: str, host: str
) -> None:
    """Every collector route (API, dashboard, health, index, unknown paths)
    answers a foreign Host with 403 host_not_allowed before routing."""
    _assert_refused(_send(named_collector.port, COLLECTOR_ROUTES[route], host), f"{route} {host}")


@pytest.mark.parametrize("host", SERVED)
@pytest.mark.parametrize("route", COLLECTOR_ROUTES)
def test_collector_serves_its_public_name_and_ip_literals(
    named_collector: CollectorProcess, route: str, host: str
) -> None:
    """Under --public-name llmobserve, the collector answers its name, IP
    literals and localhost exactly as it answers 127.0.0.1."""
    port = named_collector.port
    reference = _send(port, COLLECTOR_ROUTES[route], "127.0.0.1:{P}")
    resp = _send(port, COLLECTOR_ROUTES[route], host)
    assert resp.header("x-llmobserve-error") != b"host_not_allowed", (route, host, resp.body)
    assert resp.status == reference.status, (route, host, resp.status, resp.body[:200])


def test_collector_without_public_name_refuses_a_service_name(tmp_path: Path) -> None:
    """With no --public-name, Host: llmobserve:PORT is refused, 127.0.0.1 served."""
    with CollectorProcess(workdir=tmp_path) as collector:
        route = COLLECTOR_ROUTES["api-events"]
        _assert_refused(_send(collector.port, route, "llmobserve:{P}"), "no --public-name")
        assert _send(collector.port, route, "127.0.0.1:{P}").status == 200
