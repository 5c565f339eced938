"""Real-process tests of hostile request bytes (RELIABILITY T08-T11, bad-input §2.1/§2.2).

The vectors of §2.1 items 1-2 and the TE/CL/chunk forms that
C{test_framing.py} already sends (cl-te, te-cl, xchunked, space before the
colon, chunked+identity, ",chunked", two TE lines, CL 0+31, "5, 5", "+5",
"0x5", "1_0", chunk "0x3a", chunk bare LF, missing CRLF after chunk data)
are not repeated here; this module sends the rest of §2.1 items 3-7 and all
of §2.2, so that the two together are the whole table.

Each vector is followed on the same connection by a pipelined
C{GET /smuggled}.  Pass: a 400 with C{X-LLMObserve-Error} and a close, no
C{/smuggled} at the upstream, and no complete request at the upstream
(when the proxy refuses a request, the upstream must never have seen it
whole); or, for the few vectors §2 lets a proxy normalise, exactly the
intended request upstream (h11-clean, the right body), with the pipelined
request then being a separate, well-framed request of its own.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import pytest
from support.clients import build_request, proxy_request, raw_request
from support.hostile import Exchange, UpstreamRequest, exchange, parse_upstream, store_events
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(30)

ProxyFactory = Callable[..., ProxyProcess]


# -- the vector table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """
    C{build(proxy_port, upstream_url)} gives the bytes of the first request.
    C{statuses}: acceptable refusal statuses.  C{accept_body}: when not
    None, the proxy may instead forward one normalised request whose body
    is exactly this; C{accept_header}: and which must carry this field.
    """

    build: Callable[[int, str], bytes]
    statuses: frozenset[int] = frozenset({400})
    accept_body: bytes | None = None
    accept_header: tuple[bytes, bytes] | None = None


def _on_proxy(
    tail: bytes, *, method: str = "POST", version: str = "HTTP/1.1", path: str = "/v1/x"
) -> Callable[[int, str], bytes]:
    """A /proxy request to the upstream whose remaining header lines and body are C{tail}."""

    def build(port: int, upstream: str) -> bytes:
        return (
            f"{method} /proxy {version}\r\nHost: 127.0.0.1:{port}\r\n"
            f"X-LLMObserve-Target-URL: {upstream}{path}\r\n"
        ).encode() + tail

    return build


def _whole(template: bytes) -> Callable[[int, str], bytes]:
    """A whole request; C{{port}} and C{{up}} (upstream authority+scheme) are filled in."""

    def build(port: int, upstream: str) -> bytes:
        return (
            template.replace(b"{port}", str(port).encode())
            .replace(b"{up}", upstream.encode())
            .replace(b"{upauth}", upstream.split("://", 1)[1].encode())
        )

    return build


_TARGET = b"X-LLMObserve-Target-URL: {up}/v1/x\r\n"
_HOST = b"Host: 127.0.0.1:{port}\r\n"

#: §2.1 items 3-5 and 7, minus what test_framing.py sends.
FRAMING_VECTORS: dict[str, Vector] = {
    # 3. TE.TE obfuscations
    "te-tab": Vector(
        _on_proxy(b"Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        accept_body=b"hello",
    ),
    "te-on-http10": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", version="HTTP/1.0")
    ),
    "te-gzip-chunked": Vector(
        _on_proxy(b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    ),
    # 4. invalid Content-Length
    "cl-minus-1": Vector(_on_proxy(b"Content-Length: -1\r\n\r\nhello")),
    "cl-5-space-5": Vector(_on_proxy(b"Content-Length: 5 5\r\n\r\nhello")),
    "cl-empty": Vector(_on_proxy(b"Content-Length:\r\n\r\nhello")),
    "cl-2-pow-64": Vector(
        _on_proxy(b"Content-Length: 18446744073709551616\r\n\r\nhello"),
        statuses=frozenset({400, 413}),
    ),
    # 5. chunk-size abuse
    "chunk-minus-0": Vector(_on_proxy(b"Transfer-Encoding: chunked\r\n\r\n-0\r\n\r\n")),
    "chunk-0_2e": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n0_2e\r\n" + b"a" * 46 + b"\r\n0\r\n\r\n")
    ),
    "chunk-leading-tab": Vector(_on_proxy(b"Transfer-Encoding: chunked\r\n\r\n\t0\r\n\r\n")),
    "chunk-cr-cr": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n5\r\r;a\r\nhello\r\n0\r\n\r\n")
    ),
    "chunk-ext-del": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n5;a=\x7f\r\nhello\r\n0\r\n\r\n")
    ),
    "chunk-2000-hex-digits": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 2000 + b"\r\nhello\r\n0\r\n\r\n")
    ),
    # llhttp reads leading zeros of a chunk size without a line cap. Accepted
    # as normalised: the size is unambiguous (5) and the body is re-framed
    # upstream, so no second reading of the bytes is possible (T08 allows it).
    "chunk-2000-zero-padded": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 1999 + b"5\r\nhello\r\n0\r\n\r\n"),
        accept_body=b"hello",
    ),
    "chunk-trailer-puma": Vector(
        _on_proxy(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX:POST / HTTP/1.1\r\n")
    ),
    # 7. GET with a body: forwarded with its CL and its body, or refused
    "get-with-body": Vector(
        _on_proxy(b"Content-Length: 10\r\n\r\n1234567890", method="GET"),
        accept_body=b"1234567890",
    ),
}

#: §2.2 header syntax, request lines, forward-proxy forms and Host.
SYNTAX_VECTORS: dict[str, Vector] = {
    "obs-fold": Vector(
        _on_proxy(b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
        accept_body=b"",
        accept_header=(b"x-a", b"a b"),
    ),
    "cl-space-before-colon": Vector(_on_proxy(b"Content-Length : 5\r\n\r\nhello")),
    "empty-name": Vector(_on_proxy(b": x\r\nContent-Length: 0\r\n\r\n")),
    "name-with-space": Vector(_on_proxy(b"Foo Bar: 1\r\nContent-Length: 0\r\n\r\n")),
    "name-non-token-byte": Vector(_on_proxy(b"\xffoo: 1\r\nContent-Length: 0\r\n\r\n")),
    "value-nul": Vector(_on_proxy(b"X: a\x00b\r\nContent-Length: 0\r\n\r\n")),
    "value-bare-cr": Vector(_on_proxy(b"X: a\rb\r\nContent-Length: 0\r\n\r\n")),
    "value-bare-lf-te": Vector(
        _on_proxy(b"X: a\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    ),
    # llhttp skips repeated spaces before the target. Accepted as normalised:
    # the proxy writes its own request line upstream, so the spacing never
    # reaches another parser.
    "request-line-two-spaces": Vector(
        _whole(b"GET  /proxy HTTP/1.1\r\n" + _HOST + _TARGET + b"\r\n"),
        accept_body=b"",
    ),
    "request-line-http-1-32": Vector(
        _whole(b"GET /proxy HTTP/1.32\r\n" + _HOST + _TARGET + b"\r\n")
    ),
    "request-line-bare-lf": Vector(_whole(b"GET /proxy\nHTTP/1.1\r\n" + _HOST + _TARGET + b"\r\n")),
    "request-line-nul-method": Vector(
        _whole(b"\x00 /proxy HTTP/1.1\r\n" + _HOST + _TARGET + b"\r\n")
    ),
    "http-0.9": Vector(_whole(b"GET /proxy\r\n")),
    "absolute-form-to-upstream": Vector(
        _whole(b"GET {up}/smuggled-absolute HTTP/1.1\r\n" + _HOST + b"\r\n"),
        statuses=frozenset({400, 405}),
    ),
    "absolute-form-example": Vector(
        _whole(b"GET http://example.com/ HTTP/1.1\r\n" + _HOST + b"\r\n"),
        statuses=frozenset({400, 405}),
    ),
    "connect-to-upstream": Vector(
        _whole(b"CONNECT {upauth} HTTP/1.1\r\nHost: {upauth}\r\n\r\n"),
        statuses=frozenset({400, 405}),
    ),
    "host-with-space": Vector(_whole(b"GET /proxy HTTP/1.1\r\nHost: a b\r\n" + _TARGET + b"\r\n")),
    "host-missing": Vector(_whole(b"GET /proxy HTTP/1.1\r\n" + _TARGET + b"\r\n")),
    "host-duplicate": Vector(
        _whole(b"GET /proxy HTTP/1.1\r\n" + _HOST + _HOST + _TARGET + b"\r\n")
    ),
}


def _smuggled(port: int, upstream: str) -> bytes:
    return build_request(
        "GET",
        "/proxy",
        [("X-LLMObserve-Target-URL", upstream + "/smuggled")],
        host=f"127.0.0.1:{port}",
    )


def _assert_still_serving(proxy: ProxyProcess, upstream: RecordingUpstream) -> None:
    assert proxy.running, "proxy died:\n" + proxy.log_tail()
    data = proxy_request(proxy.port, "GET", upstream.url + "/after", [])
    resp = raw_request(proxy.port, data, timeout=5)
    assert resp.status == 200, (resp.status, resp.body[:200])


def _upstream_view(upstream: RecordingUpstream) -> tuple[list[UpstreamRequest], list[str], bytes]:
    """Every request the upstream's bytes hold (h11), the h11 complaints, all raw bytes."""
    requests: list[UpstreamRequest] = []
    errors: list[str] = []
    for conn in list(upstream.connections):
        parsed = parse_upstream(bytes(conn.raw))
        requests += parsed.requests
        if parsed.error:
            errors.append(parsed.error)
    return requests, errors, upstream.raw_bytes()


def _check_vector(
    name: str, vector: Vector, proxy: ProxyProcess, upstream: RecordingUpstream
) -> Exchange:
    data = vector.build(proxy.port, upstream.url) + _smuggled(proxy.port, upstream.url)
    ex = exchange(proxy.port, data, timeout=4.0, quiet=0.5)
    time.sleep(0.1)  # let the upstream record anything that was on its way
    requests, errors, raw = _upstream_view(upstream)
    assert ex.malformed is None, f"{name}: malformed reply: {ex.malformed}"
    assert ex.responses, f"{name}: no response (closed={ex.closed}, raw={ex.raw[:200]!r})"
    assert not errors, f"{name}: the upstream got bytes h11 rejects: {errors} in {raw[:300]!r}"
    first = ex.responses[0]
    if first.status in vector.statuses:
        # Refused: the error contract, a close, and nothing whole upstream.
        kind = first.header("x-llmobserve-error")
        assert kind, (name, first.headers)
        body = json.loads(first.body)
        assert body["error"]["type"] == kind.decode(), (name, first.body)
        assert len(ex.responses) == 1, f"{name}: answered after the refusal: {ex.statuses}"
        assert ex.closed, f"{name}: connection left open after {first.status}"
        assert b"/smuggled" not in raw, f"{name}: /smuggled reached the upstream: {raw[:400]!r}"
        assert len(requests) <= 1, f"{name}: several upstream requests: {requests!r}"
        complete = [r for r in requests if r[4]]
        assert not complete, (
            f"{name}: refused with {first.status} but the upstream got a complete request "
            f"{complete!r}"
        )
        return ex
    assert vector.accept_body is not None, (
        f"{name}: expected {sorted(vector.statuses)}, got {ex.statuses} "
        f"{first.body[:200]!r}; upstream got {raw[:300]!r}"
    )
    # Normalised: exactly the intended request, then the pipelined one on its own.
    assert first.status == 200, (name, ex.statuses, first.body[:200])
    assert requests, f"{name}: accepted but nothing upstream"
    _method, target, headers, body, ended = requests[0]
    assert target == b"/v1/x" and ended, (name, requests[0])
    assert body == vector.accept_body, (name, body)
    if vector.accept_header is not None:
        want_name, want_value = vector.accept_header
        got = [v for n, v in headers if n.lower() == want_name]
        assert got == [want_value], f"{name}: upstream {want_name!r} = {got!r}"
        assert b"\r\n " not in raw and b"\r\n\t" not in raw, f"{name}: raw obs-fold forwarded"
    assert len(requests) <= 2, (name, requests)
    for extra in requests[1:]:
        assert extra[:2] == (b"GET", b"/smuggled") and extra[3] == b"" and extra[4], (name, extra)
        assert ex.statuses == [200, 200], (name, ex.statuses)
    return ex


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


@pytest.mark.timeout(15)
@pytest.mark.parametrize("name", sorted(FRAMING_VECTORS))
def test_framing_vector(
    loopback_proxy: ProxyProcess, upstream: RecordingUpstream, name: str
) -> None:
    """T08: §2.1 items 3-5 and 7 (the rest is in test_framing.py), each + GET /smuggled."""
    _check_vector(name, FRAMING_VECTORS[name], loopback_proxy, upstream)
    _assert_still_serving(loopback_proxy, upstream)


@pytest.mark.timeout(15)
@pytest.mark.parametrize("name", sorted(SYNTAX_VECTORS))
def test_header_syntax_vector(
    loopback_proxy: ProxyProcess, upstream: RecordingUpstream, name: str
) -> None:
    """T09: every §2.2 vector (header syntax, request lines, absolute-form, CONNECT, Host)."""
    _check_vector(name, SYNTAX_VECTORS[name], loopback_proxy, upstream)
    if name.startswith(("absolute-form", "connect")):
        assert upstream.connection_count == 0, "a forward-proxy form opened an upstream connection"
    _assert_still_serving(loopback_proxy, upstream)


# -- T10 ------------------------------------------------------------------------------------

_INJECTED = re.compile(rb"(?:^|[\r\n])\s*injected\s*:", re.I)


def _assert_no_injection(upstream: RecordingUpstream, what: str) -> None:
    requests, errors, raw = _upstream_view(upstream)
    assert not errors, f"{what}: upstream bytes h11 rejects: {errors}"
    assert not _INJECTED.search(raw), f"{what}: injected header line upstream: {raw[:400]!r}"
    for _, target, headers, _, _ in requests:
        assert all(n.lower() != b"injected" for n, _ in headers), (what, headers)
        assert all(0x20 < c < 0x7F for c in target), f"{what}: raw bytes in target {target!r}"


_CRLF_TARGETS = {
    "pct-crlf-path": ("/v1/chat%0d%0aInjected:%201", b"/v1/chat%0d%0aInjected:%201"),
    "pct-crlf-query": ("/v1/chat?x=%0d%0aInjected:%201", b"/v1/chat?x=%0d%0aInjected:%201"),
    "raw-u2028-path": ("/v1/chat\u2028Injected: 1", b"/v1/chat%E2%80%A8Injected:%201"),
    "ansi-escape-path": ("/v1/\x1b[31mred\x1b[0m", None),
    "raw-space-path": ("/v1/chat Injected: 1", None),
}


@pytest.mark.parametrize("name", sorted(_CRLF_TARGETS))
def test_target_url_injection(
    loopback_proxy: ProxyProcess, upstream: RecordingUpstream, name: str
) -> None:
    """
    T10: CR/LF (percent-encoded), U+2028 and ANSI escapes in the target URL:
    the request is refused (400) or forwarded with the characters
    percent-encoded; never an injected header line upstream.
    """
    path, encoded = _CRLF_TARGETS[name]
    target = (upstream.url + path).encode("utf-8")
    data = b"GET /proxy HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-LLMObserve-Target-URL: %s\r\n\r\n" % (
        loopback_proxy.port,
        target,
    )
    ex = exchange(loopback_proxy.port, data, timeout=4.0, quiet=0.5)
    time.sleep(0.05)
    assert ex.malformed is None and ex.responses, (name, ex.raw[:200])
    status = ex.responses[0].status
    _assert_no_injection(upstream, name)
    if status == 400:
        assert ex.responses[0].header("x-llmobserve-error"), ex.responses[0].headers
        assert upstream.connection_count == 0
    else:
        assert status == 200 and encoded is not None, (name, status, ex.responses[0].body[:200])
        (req,) = upstream.wait_requests(1)
        assert req.target == encoded, (name, req.target)
    _assert_still_serving(loopback_proxy, upstream)


@pytest.mark.parametrize(
    "query",
    [b"x=%0d%0aInjected:%201", b"x=%E2%80%A8", b"x=\xe2\x80\xa8", b"x=\x1b[31m"],
    ids=["pct-crlf", "pct-u2028", "raw-u2028", "raw-ansi"],
)
def test_proxy_query_merge_injection(
    loopback_proxy: ProxyProcess, upstream: RecordingUpstream, query: bytes
) -> None:
    """T10: the /proxy query merged into the target's never injects a line or raw bytes."""
    data = (
        b"GET /proxy?%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-LLMObserve-Target-URL: %s/v1/m\r\n\r\n"
        % (query, loopback_proxy.port, upstream.url.encode())
    )
    ex = exchange(loopback_proxy.port, data, timeout=4.0, quiet=0.5)
    time.sleep(0.05)
    assert ex.malformed is None and ex.responses, ex.raw[:200]
    assert ex.responses[0].status in (200, 400), ex.statuses
    _assert_no_injection(upstream, repr(query))
    _assert_still_serving(loopback_proxy, upstream)


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


@pytest.mark.timeout(40)
def test_base_url_path_and_context_injection(proxy_factory: ProxyFactory) -> None:
    """
    T10: CRLF, U+2028 and ANSI escapes in a base-URL mode path and in the
    context header values (tags): no injected line upstream; no raw control
    characters in the proxy's log or in the stored events' fields.
    """
    with RecordingUpstream() as upstream:
        proxy = proxy_factory(*LOOPBACK_ARGS, "--base-url", f"openai={upstream.url}/base")
        port = proxy.port
        paths = [
            b"/openai/v1/chat%0d%0aInjected:%201",
            b"/openai/v1/chat%E2%80%A8x",
            b"/openai/v1/chat\xe2\x80\xa8x",
            b"/openai/v1/chat\x1b[31mx",
            b"/openai/v1/%1b[31mx",
        ]
        tags = [
            (b"X-LLMObserve-Customer-ID", b"acme%0d%0aInjected: 1"),
            (b"X-LLMObserve-Section", b"intro\xe2\x80\xa8Injected: 1"),
            (b"X-LLMObserve-Property-Team", b"\x1b[31mred\x1b[0m"),
            (b"X-LLMObserve-Run-ID", b"run\x85next"),
            (b"X_LLMObserve_Tenant_ID", b"t\xc2\x85\xe2\x80\xa9x"),
        ]
        statuses = []
        for path in paths:
            data = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)
            ex = exchange(port, data, timeout=4.0, quiet=0.3)
            assert ex.malformed is None and ex.responses, (path, ex.raw[:200])
            statuses.append(ex.responses[0].status)
        for name, value in tags:
            data = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s: %s\r\n"
            data = data % (port, name, value) + b"Content-Length: 2\r\n\r\n{}"
            ex = exchange(port, data, timeout=4.0, quiet=0.3)
            assert ex.malformed is None and ex.responses, (name, ex.raw[:200])
            statuses.append(ex.responses[0].status)
        assert set(statuses) <= {200, 400}, statuses
        time.sleep(0.1)
        _assert_no_injection(upstream, "base-url/context")
        for req in upstream.requests:
            names = [n.lower().replace(b"_", b"-") for n, _ in req.headers]
            assert not any(n.startswith(b"x-llmobserve") for n in names), req.headers
        assert proxy.terminate(10) is not None
    log = proxy.log_path.read_bytes()
    for needle in (b"\x1b", "\u2028".encode(), "\u2029".encode(), b"\r\nInjected"):
        assert needle not in log, f"raw {needle!r} in the proxy log"
    events = store_events(proxy.home / "events.sqlite3")
    for event in events:
        for key, value in event.items():
            if isinstance(value, str):
                assert not _CONTROL.search(value), f"control character in event {key}: {value!r}"


# -- T11 ------------------------------------------------------------------------------------


def _seeds(port: int, up: str) -> list[bytes]:
    host = f"127.0.0.1:{port}"
    target = ("X-LLMObserve-Target-URL", up + "/v1/chat/completions")
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    return [
        build_request("GET", "/health", host=host),
        build_request("GET", "/proxy", [target], host=host),
        build_request(
            "POST", "/proxy", [target, ("Content-Type", "application/json")], body, host=host
        ),
        build_request(
            "POST", "/proxy", [target], [b"abc", b"defgh", b"ij"], host=host, chunked=True
        ),
        build_request("POST", "/proxy", [target, ("Expect", "100-continue")], b"hello", host=host),
        build_request("GET", "/proxy?a=1&b=2", [target], host=host)
        + build_request("GET", "/proxy", [target], host=host),
        build_request(
            "POST",
            "/proxy",
            [
                target,
                ("X-LLMObserve-Customer-ID", "c1"),
                ("X_LLMObserve_Section", "s"),
                ("Authorization", "Bearer sk-x"),
                ("Connection", "keep-alive, X-Foo"),
                ("X-Foo", "1"),
            ],
            b"{}",
            host=host,
        ),
        build_request("GET", "/metrics", host=host),
        build_request(
            "POST",
            "/spans",
            [("Content-Type", "application/json")],
            b'[{"span_id":"s1"}]',
            host=host,
        ),
        build_request("DELETE", "/proxy", [target, ("Content-Length", "0")], host=host)
        + build_request("PUT", "/proxy", [target], b"x" * 40, host=host, chunked=True),
    ]


_SPECIALS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"0\r\n\r\n",
    b"\r\n\r\n",
    b"\xff",
    b"%0d%0a",
]


#: (operation, where in 0..1, its bytes or count)
Mutation = tuple[str, float, bytes | int]


def _mutate(seed: bytes, mutations: list[Mutation]) -> bytes:
    data = bytearray(seed)
    for op, where, arg in mutations:
        pos = min(int(where * len(data)), len(data))
        if op == "insert":
            data[pos:pos] = cast(bytes, arg)  # inserts carry bytes
        elif op == "delete":
            del data[pos : pos + int(arg)]
        elif op == "flip" and data:
            data[min(pos, len(data) - 1)] = int(arg)
        elif op == "dupline":
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            if end >= 0:
                data[start:start] = data[start : end + 1]
        elif op == "case":
            piece = bytes(data[pos : pos + int(arg)])
            data[pos : pos + len(piece)] = piece.swapcase()
        elif op == "special":
            data[pos:pos] = cast(bytes, arg)  # inserts carry bytes
    return bytes(data)


def _forbidden_routes() -> list[bytes]:
    """Base-URL prefixes: a mutation must never turn a request into a real provider call."""
    from parsers.registry import REGISTRY

    return [b"/" + p.id.encode() for p in REGISTRY if p.base_url]


@pytest.mark.timeout(120)
def test_request_byte_fuzz(proxy_factory: ProxyFactory) -> None:
    """
    T11: ~150 mutations of 10 valid seed requests, each sent in random
    segments on a fresh connection to one proxy process.  The proxy stays
    alive; every reply is well-formed HTTP/1.1 (h11) or a close; the
    upstream receives only h11-clean requests and never more body bytes
    than the client sent; the log has no unhandled errors.

    The proxy runs with --known-hosts-only so that no mutation of the
    target can make it resolve or reach anything but 127.0.0.1.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with RecordingUpstream() as upstream:
        proxy = proxy_factory(*LOOPBACK_ARGS, "--known-hosts-only")
        seeds = _seeds(proxy.port, upstream.url)
        forbidden = _forbidden_routes()
        position = st.floats(0, 1, allow_nan=False)
        mutation = st.one_of(
            st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
            st.tuples(st.just("delete"), position, st.integers(1, 16)),
            st.tuples(st.just("flip"), position, st.integers(0, 255)),
            st.tuples(st.just("dupline"), position, st.just(0)),
            st.tuples(st.just("case"), position, st.integers(1, 32)),
            st.tuples(st.just("special"), position, st.sampled_from(_SPECIALS)),
        )
        budget_end = time.monotonic() + 75
        failures: list[str] = []
        examples = [0]

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            seed=st.integers(0, len(seeds) - 1),
            mutations=st.lists(mutation, min_size=1, max_size=4),
            cuts=st.lists(position, max_size=4),
        )
        def run(seed: int, mutations: list[Mutation], cuts: list[float]) -> None:
            if time.monotonic() > budget_end:
                return
            data = _mutate(seeds[seed], mutations)
            lowered = data.lower()
            if any(route in lowered for route in forbidden) or not data:
                return
            examples[0] += 1
            points = sorted({int(c * len(data)) for c in cuts} - {0, len(data)})
            segments = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
            before = len(upstream.requests)
            ex = exchange(proxy.port, segments, segment_gap=0.002, timeout=2.0, quiet=0.15)
            assert proxy.running, "proxy died on " + repr(data) + "\n" + proxy.log_tail()
            assert ex.malformed is None, f"malformed reply {ex.malformed} to {data!r}"
            for resp in ex.responses:
                assert 100 <= resp.status <= 599, (resp.status, data)
                assert resp.complete or ex.closed or resp is ex.responses[-1], (resp, data)
                if resp.status >= 400 and resp.header("x-llmobserve-error") is None:
                    # An upstream-made error is impossible here (it only answers 200).
                    failures.append(f"{resp.status} without the error header for {data!r}")
            new = upstream.requests[before:]
            sent_body = sum(r.body_length for r in new)
            assert sent_body <= len(data), f"upstream got {sent_body} body bytes from {len(data)}"

        run()
        time.sleep(0.2)
        _, errors, _raw = _upstream_view(upstream)
        # A body cut short by a close is the proxy aborting a refused request (fine);
        # anything else h11 says about the upstream's bytes is not.
        bad = [
            c.error
            for c in upstream.connections
            if c.error and "without sending complete message body" not in c.error
        ]
        assert not errors and not bad, f"upstream got unclean requests: {errors} {bad}"
        assert examples[0] >= 50, f"only {examples[0]} examples ran"
        assert not failures, failures[:5]
        print(f"fuzz: {examples[0]} examples, {len(upstream.requests)} upstream requests")
        health = raw_request(
            proxy.port, build_request("GET", "/health", host=f"127.0.0.1:{proxy.port}")
        )
        assert health.status == 200
        log = proxy.log_text()
        for marker in ("Unhandled", "Traceback"):
            assert marker not in log, f"{marker!r} in the proxy log:\n{proxy.log_tail(60)}"
