"""The one Host guard of the proxy and the collector (llmobserve.hostguard)."""

from __future__ import annotations

import json

import pytest
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from llmobserve.hostguard import HostGuard, HostGuardedSite, public_name


@pytest.mark.parametrize(
    "host",
    [
        b"127.0.0.1:9000",
        b"127.0.0.1",
        b"10.1.2.3:8000",
        b"[::1]:9000",
        b"[::1]",
        b"[2001:db8::7]:80",
        b"localhost:9000",
        b"LOCALHOST",
        b"localhost.:9000",
    ],
)
def test_ip_literals_and_localhost_are_admitted(host: bytes) -> None:
    """IP literals (a browser connected to that address) and localhost pass."""
    assert HostGuard().refusal([host]) is None


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example:9000",
        b"evil.example",
        b"localhost.evil.example:9000",
        b"127.0.0.1.evil.example:9000",
        b"sub.localhost:9000",
        b"127.1:9000",
        b"999.1.1.1",
        b"llmobserve:9000",
    ],
)
def test_foreign_names_are_a_403(host: bytes) -> None:
    """Any other name (DNS rebinding) is refused: 403 host_not_allowed."""
    refusal = HostGuard().refusal([host])
    assert refusal is not None
    assert (refusal.status, refusal.kind) == (403, "host_not_allowed")


@pytest.mark.parametrize(
    "hosts",
    [[], [b"127.0.0.1", b"127.0.0.1"], [b"a b"], [b"[::1"], [b"[nothex]:80"], [b"x:9:9"]],
)
def test_missing_repeated_or_malformed_host_is_a_400(hosts: list[bytes]) -> None:
    """No Host, two of them, or one that is not an authority: 400 bad_request."""
    refusal = HostGuard().refusal(hosts)
    assert refusal is not None
    assert (refusal.status, refusal.kind) == (400, "bad_request")


def test_public_names_are_admitted_case_insensitively() -> None:
    """--public-name NAME admits Host: NAME[:PORT], in any case; others stay refused."""
    guard = HostGuard(["llmobserve", "Proxy.Internal.Example."])
    for host in (b"llmobserve:9000", b"LLMobserve", b"proxy.internal.example:80"):
        assert guard.refusal([host]) is None, host
    assert guard.refusal([b"other:9000"]) is not None


def test_admitted_values_are_remembered_and_bounded() -> None:
    """An admitted value is answered from a set; the set never grows past 256."""
    guard = HostGuard()
    for i in range(1000):
        assert guard.refusal([b"127.0.0.1:%d" % i]) is None
        assert len(guard._seen) <= 256
    assert guard.refusal([b"evil.example"]) is not None
    assert b"evil.example" not in guard._seen


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("llmobserve", "llmobserve"),
        ("Proxy.Example.", "proxy.example"),
        ("bücher.de", "xn--bcher-kva.de"),
    ],
)
def test_public_name_canonical_form(given: str, canonical: str) -> None:
    assert public_name(given) == canonical


@pytest.mark.parametrize(
    "bad", ["", "http://llmobserve", "llmobserve:9000", "a b", "-x", "*.example"]
)
def test_public_name_refuses_what_is_not_a_name(bad: str) -> None:
    """--public-name takes a bare host name: no scheme, port, wildcard or space."""
    with pytest.raises(ValueError):
        public_name(bad)


def _render(site: HostGuardedSite, host: bytes | None, path: bytes = b"/x") -> Request:
    channel = DummyChannel()
    request = Request(channel, False)
    request.written_to = channel.transport.written  # type: ignore[attr-defined]  # a test's note on the request
    request.method = b"GET"
    request.uri = request.path = path
    request.prepath = []
    request.postpath = path[1:].split(b"/")
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    request.site = site
    resource = site.getResourceFor(request)
    request.render(resource)
    return request


def test_guarded_site_refuses_before_routing() -> None:
    """HostGuardedSite answers a foreign Host with the error contract on any
    path, without ever asking the resource tree; an admitted Host is routed."""
    asked: list[bytes] = []

    class Leaf(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            asked.append(request.path)
            return b"ok"

    site = HostGuardedSite(Leaf(), HostGuard(["llmobserve"]))  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated
    refused = _render(site, b"evil.example:8000")
    assert refused.code == 403
    assert refused.responseHeaders.getRawHeaders(b"x-llmobserve-error") == [b"host_not_allowed"]
    written = refused.written_to.getvalue()  # type: ignore[attr-defined]  # set by _render
    body = json.loads(written.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "host_not_allowed"
    assert _render(site, None).code == 400
    assert asked == []
    assert _render(site, b"llmobserve:8000").code == 200
    assert asked == [b"/x"]


@pytest.mark.parametrize("plugin", ["proxy", "collector"])
def test_public_name_option_is_repeatable_and_checked(plugin: str) -> None:
    """--public-name NAME on twistd llmobserve and llmobserve-collector:
    repeatable, canonicalised; a URL or NAME:PORT is refused naming the option."""
    from twisted.python import usage

    from llmobserve.collector._tap import Options as CollectorOptions
    from llmobserve.proxy._tap import Options as ProxyOptions

    make = ProxyOptions if plugin == "proxy" else CollectorOptions
    options = make()
    options.parseOptions(["--public-name", "llmobserve", "--public-name", "Proxy.Internal."])
    assert options["public-name"] == ["llmobserve", "proxy.internal"]
    default = make()
    default.parseOptions([])
    assert default["public-name"] == []
    with pytest.raises(usage.UsageError, match="--public-name"):
        make().parseOptions(["--public-name", "http://llmobserve:9000"])
