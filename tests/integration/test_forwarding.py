"""Real-process tests of forwarding: routes, headers, statuses, target policy.

Each test starts nothing but fake loopback upstreams; the proxy is a real
C{twistd -n llmobserve} subprocess (see C{conftest.py}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from support.clients import RawClient, RawResponse, proxy_request, raw_request
from support.proxy import ProxyProcess
from support.upstreams import RecordedRequest, RecordingUpstream, Response, closed_port

pytestmark = pytest.mark.timeout(30)

ProxyFactory = Callable[..., ProxyProcess]


def _via(
    proxy: ProxyProcess,
    method: str,
    target_url: str,
    headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
    *,
    path: str = "/proxy",
    chunked: bool = False,
) -> RawResponse:
    data = proxy_request(
        proxy.port, method, target_url, headers or [], body, path=path, chunked=chunked
    )
    return raw_request(proxy.port, data, method=method, timeout=10)


def _names(req: RecordedRequest) -> list[bytes]:
    return req.header_names()


def _assert_proxy_error(resp: RawResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    kind = resp.header("x-llmobserve-error")
    assert kind, f"no X-LLMObserve-Error header in {resp.headers!r}"
    body: dict[str, Any] = json.loads(resp.body)
    assert body["error"]["type"] == kind.decode()
    assert body["error"]["message"]
    return body


def test_health_json(loopback_proxy: ProxyProcess) -> None:
    """GET /health answers 200 JSON naming the service, its version, link state and backlog."""
    resp = raw_request(
        loopback_proxy.port,
        f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{loopback_proxy.port}\r\n\r\n".encode(),
    )
    assert resp.status == 200
    assert (resp.header("content-type") or b"").startswith(b"application/json")
    doc = resp.json()
    assert doc["status"] == "ok"
    assert doc["service"] == "llmobserve-proxy"
    assert isinstance(doc["version"], str) and doc["version"]
    assert "collector" in doc
    assert isinstance(doc["events_waiting"], int)


def test_post_forwarded_unchanged(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """A JSON POST reaches the upstream with the same method, path, body; the answer comes back."""
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    resp = _via(
        loopback_proxy,
        "POST",
        recording_upstream.url + "/v1/chat/completions",
        [("Content-Type", "application/json")],
        body,
    )
    assert resp.status == 200
    assert resp.json()["usage"]["total_tokens"] == 12
    (req,) = recording_upstream.wait_requests(1)
    assert (req.method, req.target, req.body) == (b"POST", b"/v1/chat/completions", body)
    assert req.header("content-type") == b"application/json"


def test_own_headers_consumed_credentials_forwarded(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """
    Every X-LLMObserve-* header (any case, '_' spelling) is consumed and never
    reaches the upstream; Authorization, x-api-key and other end-to-end
    fields arrive unchanged, byte for byte.
    """
    ours = [
        ("X-LLMObserve-Run-ID", "run-1"),
        ("x-llmobserve-section", "agent/step"),
        ("X-LLMOBSERVE-CUSTOMER-ID", "cust-9"),
        ("X_LLMObserve_Tenant_ID", "tenant-2"),
        ("x_llmobserve_property_team", "search"),
        ("X-LLMObserve-Property-Feature", "chat"),
        ("X-Llmobserve-Span-Id", "span-1"),
    ]
    credentials = [
        ("Authorization", "Bearer sk-canary-AbC123=="),
        ("x-api-key", "canary-key-XyZ"),
        ("api-key", "azure-canary"),
        ("OpenAI-Organization", "org-123"),
        ("anthropic-version", "2023-06-01"),
    ]
    resp = _via(loopback_proxy, "POST", recording_upstream.url + "/v1/x", ours + credentials, b"{}")
    assert resp.status == 200
    (req,) = recording_upstream.wait_requests(1)
    leaked = [n for n in _names(req) if n.replace(b"_", b"-").startswith(b"x-llmobserve")]
    assert leaked == [], f"our headers reached the upstream: {req.headers!r}"
    for name, value in credentials:
        assert req.header_values(name) == [value.encode()], (name, req.headers)


def test_hop_by_hop_dropped_both_ways(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """
    T01: hop-by-hop fields (RFC 9110 7.6.1) and fields named in Connection
    are dropped in both directions; end-to-end fields arrive unchanged.  A
    Connection header the proxy itself writes may only say close/keep-alive.
    """
    recording_upstream.respond_with(
        Response(
            200,
            [
                ("Content-Type", "application/json"),
                ("Connection", "X-Bar"),
                ("X-Bar", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic realm=x"),
                ("OpenAI-Processing-Ms", "42"),
                ("x-request-id", "req-abc"),
            ],
            b'{"ok":true}',
        )
    )
    resp = _via(
        loopback_proxy,
        "POST",
        recording_upstream.url + "/v1/x",
        [
            ("Connection", "keep-alive, X-Foo"),
            ("X-Foo", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers, deflate"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Trailer", "X-T"),
            ("OpenAI-Organization", "org-1"),
            ("anthropic-version", "2023-06-01"),
        ],
        b"{}",
    )
    assert resp.status == 200
    (req,) = recording_upstream.wait_requests(1)
    up = set(_names(req))
    for name in (
        b"x-foo",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"proxy-authorization",
        b"trailer",
    ):
        assert name not in up, (name, req.headers)
    for value in req.header_values("te"):
        assert value.strip().lower() == b"trailers", req.headers
    for value in req.header_values("connection"):
        tokens = {t.strip().lower() for t in value.split(b",")}
        assert tokens <= {b"close", b"keep-alive"}, req.headers
    assert req.header("openai-organization") == b"org-1"
    assert req.header("anthropic-version") == b"2023-06-01"

    down = set(resp.header_names())
    for name in (b"x-bar", b"keep-alive", b"proxy-authenticate"):
        assert name not in down, (name, resp.headers)
    for value in resp.header_values("connection"):
        assert b"x-bar" not in value.lower(), resp.headers
    assert resp.header("openai-processing-ms") == b"42"
    assert resp.header("x-request-id") == b"req-abc"
    assert resp.body == b'{"ok":true}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_host_one_framing_header(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream, chunked: bool
) -> None:
    """
    T02: the upstream gets exactly one Host (the target's authority, not the
    proxy's) and exactly one framing header, with a byte-identical body, for
    both a Content-Length and a chunked client body.
    """
    pieces = [b"abc", b"defgh", b"ij"]
    body = b"".join(pieces)
    data = proxy_request(
        loopback_proxy.port,
        "POST",
        recording_upstream.url + "/v1/embeddings",
        [],
        pieces if chunked else body,
        chunked=chunked,
    )
    resp = raw_request(loopback_proxy.port, data, method="POST")
    assert resp.status == 200
    (req,) = recording_upstream.wait_requests(1)
    assert req.header_values("host") == [recording_upstream.authority.encode()]
    framing = req.header_values("content-length") + req.header_values("transfer-encoding")
    assert len(framing) == 1, req.headers
    assert req.body == body
    assert recording_upstream.connections[0].error is None


def test_redirect_passed_back_not_followed(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """A 302 from the upstream reaches the client unchanged; the proxy never follows it."""
    with RecordingUpstream() as elsewhere:
        location = elsewhere.url + "/moved"
        recording_upstream.respond_with(Response(302, [("Location", location)], b"moved"))
        resp = _via(loopback_proxy, "GET", recording_upstream.url + "/v1/old")
        assert resp.status == 302
        assert resp.header("location") == location.encode()
        assert resp.body == b"moved"
        assert len(recording_upstream.wait_requests(1)) == 1
        assert elsewhere.connection_count == 0


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503, 529])
def test_upstream_error_status_passes_through(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream, status: int
) -> None:
    """Upstream error statuses pass through with their body byte for byte and no error header."""
    body = json.dumps(
        {"error": {"message": f"upstream says {status}", "type": "x", "code": None}}
    ).encode()
    recording_upstream.respond_with(
        Response(
            status,
            [("Content-Type", "application/json"), ("Retry-After", "7"), ("x-request-id", "r1")],
            body,
        )
    )
    resp = _via(loopback_proxy, "POST", recording_upstream.url + "/v1/x", body=b"{}")
    assert resp.status == status
    assert resp.body == body
    assert resp.header("retry-after") == b"7"
    assert resp.header("x-request-id") == b"r1"
    assert resp.header("x-llmobserve-error") is None


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/v1/chat/completions",
        "loopback",
    ],
    ids=["metadata", "private", "loopback"],
)
def test_forbidden_targets_refused(
    default_proxy: ProxyProcess, recording_upstream: RecordingUpstream, target: str
) -> None:
    """
    Metadata, private and (without --allow-cidr) loopback targets get 403
    with X-LLMObserve-Error before any byte goes upstream: the loopback
    canary records zero connections.
    """
    url = recording_upstream.url + "/v1/x" if target == "loopback" else target
    resp = _via(default_proxy, "POST", url, [("Authorization", "Bearer k")], b"{}")
    _assert_proxy_error(resp, 403)
    assert recording_upstream.connection_count == 0


def test_upstream_down_is_502(loopback_proxy: ProxyProcess) -> None:
    """A target whose port refuses connections gives 502 with X-LLMObserve-Error."""
    resp = _via(loopback_proxy, "GET", f"http://127.0.0.1:{closed_port()}/v1/models")
    _assert_proxy_error(resp, 502)


def test_query_params_merged(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """Query parameters given on /proxy itself are merged into the target's query."""
    resp = _via(
        loopback_proxy,
        "GET",
        recording_upstream.url + "/v1/search?a=1&shared=t",
        path="/proxy?extra=2&b=x%20y",
    )
    assert resp.status == 200
    (req,) = recording_upstream.wait_requests(1)
    assert req.path == "/v1/search"
    q = req.query
    assert q["a"] == ["1"]
    assert q["shared"] == ["t"]
    assert q["extra"] == ["2"]
    assert q["b"] == ["x y"]


def test_base_url_mode(proxy_factory: ProxyFactory, recording_upstream: RecordingUpstream) -> None:
    """/openai/<rest> goes to --base-url openai=URL with <rest> as the path, Host from the URL."""
    proxy = proxy_factory(
        "--allow-cidr", "127.0.0.1/32", "--base-url", f"openai={recording_upstream.url}"
    )
    with RawClient(proxy.port) as client:
        resp = client.request(
            "POST",
            "/openai/v1/chat/completions?x=1",
            [("Authorization", "Bearer sk-1")],
            b"{}",
        )
    assert resp.status == 200
    (req,) = recording_upstream.wait_requests(1)
    assert req.target == b"/v1/chat/completions?x=1"
    assert req.header_values("host") == [recording_upstream.authority.encode()]
    assert req.header("authorization") == b"Bearer sk-1"


def test_base_url_host_is_admitted_and_a_doubled_version_warned(
    proxy_factory: ProxyFactory, recording_upstream: RecordingUpstream
) -> None:
    """A newcomer's C{--base-url openai=URL} to a local server, alone (no
    C{--allow-cidr}, no C{--provider-host}): the operator named that host, so
    base-URL calls reach it (they were refused, 403 not_allowed loopback). A URL
    ending in C{/v1}, as the openai client's own base_url does, gets one start-up
    warning, since the client's path has its C{/v1} too; one without it gets none."""
    doubled = proxy_factory("--base-url", f"openai={recording_upstream.url}/v1")
    plain = proxy_factory("--base-url", f"openai={recording_upstream.url}")
    for proxy in (doubled, plain):
        with RawClient(proxy.port) as client:
            resp = client.request("POST", "/openai/v1/chat/completions", [], b"{}")
        assert resp.status == 200
    first, second = recording_upstream.wait_requests(2)
    assert (first.target, second.target) == (b"/v1/v1/chat/completions", b"/v1/chat/completions")
    warning = "base-URL mode appends the client's whole path"
    assert warning in doubled.log_text()
    assert "(without /v1)" in doubled.log_text()
    assert warning not in plain.log_text()


def test_keep_alive_client_connection_reused(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """Several requests on one client connection are each forwarded and answered in order."""
    with RawClient(loopback_proxy.port) as client:
        for i in range(3):
            client.send(
                proxy_request(
                    loopback_proxy.port, "POST", recording_upstream.url + f"/v1/n{i}", [], b"{}"
                )
            )
            assert client.read_response(method="POST").status == 200
    assert [r.target for r in recording_upstream.wait_requests(3)] == [
        b"/v1/n0",
        b"/v1/n1",
        b"/v1/n2",
    ]
