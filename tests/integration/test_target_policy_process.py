"""Real-process tests of the target policy and the inbound boundary (RELIABILITY T15-T18).

Every refused target names either a non-loopback address (which the proxy
must refuse before connecting: it is never connected to) or the port of
a loopback canary listener, which must record zero connections.  Names
are mapped with C{--resolve} (curl-style, still policy-checked), or asked
of a fake DNS server on 127.0.0.1 (C{--dns-server}), so no test depends on
the machine's DNS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
from support.clients import RawResponse, build_request, proxy_request, raw_request
from support.fakedns import FakeDNS
from support.hostile import grep_tree, store_events
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordedRequest, RecordingUpstream, Response, json_response

pytestmark = pytest.mark.timeout(30)

ProxyFactory = Callable[..., ProxyProcess]


def _via(
    proxy: ProxyProcess,
    target_url: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    path: str = "/proxy",
) -> RawResponse:
    data = proxy_request(proxy.port, method, target_url, headers or [], body, path=path)
    return raw_request(proxy.port, data, method=method, timeout=10)


def _assert_refused(resp: RawResponse, statuses: tuple[int, ...], what: str) -> str:
    assert resp.status in statuses, (what, resp.status, resp.body[:200])
    kind = resp.header("x-llmobserve-error")
    assert kind, f"{what}: no X-LLMObserve-Error in {resp.headers!r}"
    assert json.loads(resp.body)["error"]["type"] == kind.decode(), (what, resp.body)
    return kind.decode()


@pytest.fixture
def canary() -> Iterator[RecordingUpstream]:
    """A loopback listener that must never be connected to."""
    with RecordingUpstream() as server:
        yield server


# -- T15: the §2.5 vector list -------------------------------------------------------------

#: {C} is the canary's port.  Non-loopback addresses appear only here, as
#: targets that must be refused before any connect.
SSRF_VECTORS = {
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "metadata-mapped-v6": "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "metadata-mapped-v6-hex": "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "aws-imds-v6": "http://[fd00:ec2::254]/latest/meta-data/",
    "private-10": "http://10.0.0.1/v1/chat/completions",
    "private-172": "http://172.16.0.1/",
    "private-192": "http://192.168.1.1/",
    "cgnat": "http://100.64.0.1/",
    "multicast": "http://224.0.0.1/",
    "broadcast": "http://255.255.255.255/",
    "link-local-v6": "http://[fe80::1]/",
    "this-network": "http://0.0.0.0:{C}/",
    "zero": "http://0:{C}/",
    "loopback": "http://127.0.0.1:{C}/v1/x",
    "loopback-other": "http://127.0.0.2:{C}/v1/x",
    "loopback-trailing-dot": "http://127.0.0.1.:{C}/v1/x",
    "loopback-v6": "http://[::1]:{C}/v1/x",
    "loopback-mapped-v6": "http://[::ffff:7f00:1]:{C}/v1/x",
    "decimal": "http://2130706433:{C}/",
    "octal": "http://0177.0.0.1:{C}/",
    "hex-short": "http://0x7f.1:{C}/",
    "short": "http://127.1:{C}/",
    "localhost": "http://localhost:{C}/",
    "localhost-dot": "http://localhost.:{C}/",
    "sub-localhost": "http://api.localhost:{C}/",
    "userinfo-provider": "http://api.openai.com@127.0.0.1:{C}/",
    "userinfo-user-pass": "http://user:pass@127.0.0.1:{C}/",
    "userinfo-empty": "http://@127.0.0.1:{C}/",
    "backslash": "http://127.0.0.1:{C}\\@api.openai.com/",
    "bracketed-name": "http://[example.com]/",
    "bracketed-name-port": "http://[localhost]:{C}/",
    "scheme-file": "file:///etc/passwd",
    "scheme-gopher": "gopher://127.0.0.1:{C}/_x",
    "scheme-relative": "//127.0.0.1:{C}/",
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(SSRF_VECTORS))
def test_ssrf_vector_refused(
    default_proxy: ProxyProcess, canary: RecordingUpstream, name: str
) -> None:
    """
    T15: each §2.5 target gets 403 (or 400 for malformed ones) with the
    error header, before any connection: the loopback canary, whose port
    the loopback forms name, records zero connections.
    """
    url = SSRF_VECTORS[name].replace("{C}", str(canary.port))
    resp = _via(default_proxy, url, "POST", [("Authorization", "Bearer k")], b"{}")
    _assert_refused(resp, (400, 403), name)
    time.sleep(0.05)
    assert canary.connection_count == 0, f"{name}: the canary was connected to"


@pytest.mark.timeout(20)
def test_resolved_names_filtered_by_address(
    proxy_factory: ProxyFactory, canary: RecordingUpstream
) -> None:
    """
    T15/T16: a name is judged by every address it resolves to.  Mapped to
    10.0.0.1 or to the metadata address: 403.  Mapped to 127.0.0.1 and
    10.0.0.1 while only 127.0.0.1/32 is allowed: 403 (one bad address is
    enough), and the canary on 127.0.0.1 sees nothing.
    """
    proxy = proxy_factory(
        "--allow-cidr",
        "127.0.0.1/32",
        "--connect-timeout",
        "1",
        "--resolve",
        "private.example.test=10.0.0.1",
        "--resolve",
        "meta.example.test=169.254.169.254",
        "--resolve",
        "mixed.example.test=127.0.0.1",
        "--resolve",
        "mixed.example.test=10.0.0.1",
        "--resolve",
        "mapped.example.test=::ffff:10.0.0.1",
    )
    for host in ("private", "meta", "mixed", "mapped"):
        url = f"http://{host}.example.test:{canary.port}/v1/x"
        kind = _assert_refused(_via(proxy, url), (403,), host)
        assert kind == "not_allowed", (host, kind)
    time.sleep(0.05)
    assert canary.connection_count == 0


@pytest.mark.timeout(30)
def test_dns_rebinding_reaches_only_the_checked_address(proxy_factory: ProxyFactory) -> None:
    """
    T16 with a real DNS server (C{--dns-server}): a name first answered with
    127.0.0.1 (admitted) is forwarded there, Host the name; re-pointed at
    ::1 (loopback, refused) with TTL 0, the next call within the policy's
    5 s verdict reuses the checked 127.0.0.1 without asking again, and the
    first call after it asks afresh and is refused. A canary on [::1] at
    the same port never sees a connection.
    """
    with FakeDNS({"rebind.test": ["127.0.0.1"]}) as names, RecordingUpstream() as upstream:
        with RecordingUpstream(host="::1", port=upstream.port) as canary:
            proxy = proxy_factory("--allow-cidr", "127.0.0.1/32", "--dns-server", names.server)
            url = f"http://rebind.test:{upstream.port}/v1/models"
            first = _via(proxy, url)
            assert first.status == 200, (first.status, first.body[:200])
            (req,) = upstream.wait_requests(1)
            assert req.header("host") == f"rebind.test:{upstream.port}".encode()
            assert names.lookups("rebind.test", "A") == 1

            names.set("rebind.test", ["::1"])
            assert _via(proxy, url).status == 200  # the checked address, pinned
            assert names.lookups("rebind.test", "A") == 1
            upstream.wait_requests(2)

            time.sleep(5.2)  # past the verdict's 5 s
            refused = _via(proxy, url)
            assert _assert_refused(refused, (403,), "rebound") == "not_allowed"
            assert names.lookups("rebind.test", "A") == 2
            time.sleep(0.05)
            assert canary.connection_count == 0
            assert len(upstream.requests) == 2


def test_a_name_the_dns_server_does_not_know_is_a_502(proxy_factory: ProxyFactory) -> None:
    """NXDOMAIN from C{--dns-server}: 502 unresolvable, nothing connected."""
    with FakeDNS({}) as names:
        proxy = proxy_factory("--allow-cidr", "127.0.0.1/32", "--dns-server", names.server)
        resp = _via(proxy, "http://nowhere.test:9/v1/models")
        assert _assert_refused(resp, (502,), "nxdomain") == "unresolvable"
        assert names.lookups("nowhere.test", "A") == 1


def test_public_looking_name_forwarded_with_its_host(
    proxy_factory: ProxyFactory, recording_upstream: RecordingUpstream
) -> None:
    """
    T15 control: an unknown name whose addresses pass the filter (here
    127.0.0.1, admitted by --allow-cidr) is forwarded, with Host the name
    and the port, not the address.
    """
    proxy = proxy_factory(
        "--allow-cidr", "127.0.0.1/32", "--resolve", "public.example.test=127.0.0.1"
    )
    url = f"http://public.example.test:{recording_upstream.port}/v1/models?limit=1"
    resp = _via(proxy, url)
    assert resp.status == 200, (resp.status, resp.body[:200])
    (req,) = recording_upstream.wait_requests(1)
    assert req.header("host") == f"public.example.test:{recording_upstream.port}".encode()
    assert req.target == b"/v1/models?limit=1"


def test_redirect_to_metadata_passed_back_once(
    loopback_proxy: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """T15: a 302 to the metadata address reaches the client unchanged; one upstream request."""
    location = b"http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    recording_upstream.respond_with(Response(302, [("Location", location)], b"see other"))
    resp = _via(loopback_proxy, recording_upstream.url + "/v1/files", "POST", [], b"{}")
    assert resp.status == 302
    assert resp.header("location") == location
    assert resp.body == b"see other"
    assert resp.header("x-llmobserve-error") is None
    time.sleep(0.2)
    assert len(recording_upstream.requests) == 1, recording_upstream.requests


@pytest.mark.timeout(20)
def test_target_is_the_proxy_itself(proxy_factory: ProxyFactory) -> None:
    """
    T15 (§2.5 item 6): a target that points at the proxy's own port, as an
    IP, as localhost, or as a name resolving to 127.0.0.1, gives 508;
    with --no-via too (caught by the address, not by Via).
    """
    for extra in ((), ("--no-via",)):
        proxy = proxy_factory(*LOOPBACK_ARGS, "--resolve", "self.example.test=127.0.0.1", *extra)
        for host in ("127.0.0.1", "localhost", "self.example.test"):
            resp = _via(proxy, f"http://{host}:{proxy.port}/proxy")
            kind = _assert_refused(resp, (508,), f"{host} {extra}")
            assert kind == "loop", kind
        assert proxy.running


# -- T17: inbound boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{P}",
        "evil.example",
        "localhost.evil.example:{P}",
        "127.0.0.1.evil.example:{P}",
    ],
)
def test_foreign_host_header_refused(
    loopback_proxy: ProxyProcess, canary: RecordingUpstream, host: str
) -> None:
    """T17: a Host that is not the proxy's own gets 403 host_not_allowed; nothing upstream."""
    data = build_request(
        "GET",
        "/proxy",
        [("X-LLMObserve-Target-URL", canary.url + "/v1/x")],
        host=host.replace("{P}", str(loopback_proxy.port)),
    )
    resp = raw_request(loopback_proxy.port, data)
    kind = _assert_refused(resp, (403,), host)
    assert kind == "host_not_allowed", kind
    time.sleep(0.05)
    assert canary.connection_count == 0


@pytest.mark.parametrize("path", ["/proxy", "/health", "/openai/v1/chat/completions", "/spans"])
def test_no_permissive_cors(loopback_proxy: ProxyProcess, path: str) -> None:
    """T17: preflights and simple requests from a web origin never get Access-Control-Allow-*."""
    host = f"127.0.0.1:{loopback_proxy.port}"
    preflight = build_request(
        "OPTIONS",
        path,
        [
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type, x-llmobserve-target-url"),
        ],
        host=host,
    )
    simple = build_request("GET", "/health", [("Origin", "https://evil.example")], host=host)
    for data, method in ((preflight, "OPTIONS"), (simple, "GET")):
        resp = raw_request(loopback_proxy.port, data, method=method, timeout=10)
        allow = [n for n in resp.header_names() if n.startswith(b"access-control-allow")]
        assert not allow, (path, method, resp.headers)


# -- T18: secrets and context hygiene ---------------------------------------------------------

CANARIES = {
    "authorization": b"sk-CANARYauth7f3a91",
    "x-api-key": b"CANARYxapikey19bd2",
    "api-key": b"CANARYapikey55e1c",
    "Api-Key": b"CANARYApiKeyMixed4d",
    "x-goog-api-key": b"CANARYgoog8c2d77",
    "cookie": b"CANARYcookiea1b2c3",
    "query-key": b"CANARYquery4e6f0",
    "proxy-query-key": b"CANARYpq9a8b7",
    "gemini-key": b"CANARYgemini31f2",
    "set-cookie": b"CANARYsetcookie6e5d",
}


@pytest.mark.timeout(40)
def test_secrets_never_stored_or_logged(
    proxy_factory: ProxyFactory, recording_upstream: RecordingUpstream
) -> None:
    """
    T18: credentials in Authorization, x-api-key, api-key, Api-Key,
    x-goog-api-key, ?key= and Cookie reach the upstream unchanged, and our
    context headers do not (any case, '_' or '-').  After the proxy stops,
    no canary appears in any file it wrote: log, spool, embedded store.
    """
    c = {k: v.decode() for k, v in CANARIES.items()}
    recording_upstream.respond_with(
        json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            },
            headers=[("Set-Cookie", f"sid={c['set-cookie']}; HttpOnly")],
        )
    )
    up = recording_upstream
    proxy = proxy_factory(
        *LOOPBACK_ARGS,
        "--provider-host",
        f"127.0.0.1:{up.port}=openai",
        "--base-url",
        f"gemini={up.url}",
    )
    context = [
        ("X-LLMObserve-Customer-ID", "cust-1"),
        ("x_llmobserve_section", "agent"),
        ("X-LLMOBSERVE-RUN-ID", "run-1"),
        ("X_LLMObserve_Property_Team", "search"),
    ]
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    calls = [
        ("authorization", [("Authorization", f"Bearer {c['authorization']}")]),
        ("x-api-key", [("x-api-key", c["x-api-key"])]),
        ("api-key", [("api-key", c["api-key"])]),
        ("Api-Key", [("Api-Key", c["Api-Key"])]),
        ("x-goog-api-key", [("x-goog-api-key", c["x-goog-api-key"])]),
        ("cookie", [("Cookie", f"session={c['cookie']}; theme=dark")]),
    ]
    for _, headers in calls:
        resp = _via(proxy, up.url + "/v1/chat/completions", "POST", context + headers, body)
        assert resp.status == 200, resp.body[:200]
    resp = _via(proxy, up.url + f"/v1/chat/completions?key={c['query-key']}", "POST", context, body)
    assert resp.status == 200
    resp = _via(
        proxy,
        up.url + "/v1/chat/completions",
        "POST",
        context,
        body,
        path=f"/proxy?key={c['proxy-query-key']}",
    )
    assert resp.status == 200
    gemini = build_request(
        "POST",
        f"/gemini/v1beta/models/gemini-1.5-flash:generateContent?key={c['gemini-key']}",
        context,
        b'{"contents":[{"parts":[{"text":"hi"}]}]}',
        host=f"127.0.0.1:{proxy.port}",
    )
    assert raw_request(proxy.port, gemini, method="POST").status == 200

    requests = up.wait_requests(len(calls) + 3)
    assert len(requests) == len(calls) + 3
    for req in requests:
        ours = [n for n in req.header_names() if n.replace(b"_", b"-").startswith(b"x-llmobserve")]
        assert not ours, f"context headers reached the upstream: {req.headers!r}"
    for (name, headers), req in zip(calls, requests, strict=False):
        for hname, hvalue in headers:
            assert req.header_values(hname) == [hvalue.encode()], (name, req.headers)
    assert req_query(requests[len(calls)]) == c["query-key"]
    assert req_query(requests[len(calls) + 1]) == c["proxy-query-key"]
    assert req_query(requests[len(calls) + 2]) == c["gemini-key"]

    time.sleep(0.5)  # let the events reach the embedded store
    assert proxy.terminate(15) is not None
    events = store_events(proxy.home / "events.sqlite3")
    assert len(events) >= len(calls) + 3, f"only {len(events)} events stored"
    # Positive control: the grep does see what the proxy stores (a context label).
    assert grep_tree(proxy.home, [b"cust-1"]), "context label not found: is the store readable?"
    hits = grep_tree(proxy.workdir, CANARIES.values())
    assert not hits, f"secrets written to disk: {hits}"


def req_query(req: RecordedRequest) -> str:
    values = req.query.get("key", [])
    return values[0] if values else ""
