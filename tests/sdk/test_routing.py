"""The routing decision: which targets go through the proxy."""

from __future__ import annotations

import pytest

from llmobserve.sdk._routing import Router, RoutingConfig, is_policy_refusal

CONFIG = RoutingConfig.build(
    "http://127.0.0.1:9000",
    collector_url="http://collector.example:8000",
    provider_hosts={
        "127.0.0.1:8080": "openai",
        "vllm.lan": "openai",
        "[::1]:8443": "openai",
        "http://gateway.lan:7000": "openai",
    },
    exclude_hosts=["internal.example.com", "*.corp.example", "api.skip.test:8443"],
)


@pytest.mark.parametrize(
    ("url", "routed"),
    [
        ("https://api.openai.com/v1/chat/completions", True),
        ("https://my-index.svc.pinecone.io/query", True),
        ("http://graphql.example.org/graphql", True),
        ("https://API.OpenAI.com/v1", True),
        # the proxy and collector themselves
        ("http://127.0.0.1:9000/health", False),
        ("http://collector.example:8000/api/events", False),
        # localhost and literal non-public addresses
        ("http://localhost:11434/api/chat", False),
        ("http://app.localhost/x", False),
        ("http://127.0.0.1:5000/", False),
        ("http://10.0.0.5/", False),
        ("http://192.168.1.2:8000/", False),
        ("http://172.16.0.1/", False),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://100.64.0.1/", False),
        ("http://[::1]:8000/", False),
        ("http://[fe80::1]/", False),
        ("http://[::ffff:10.0.0.1]/", False),
        ("http://0.0.0.0:80/", False),
        ("http://224.0.0.1/", False),
        ("http://8.8.8.8/dns", True),
        ("http://[2001:4860:4860::8888]/", True),
        # named in provider_hosts: routed even when local
        ("http://127.0.0.1:8080/v1/chat/completions", True),
        ("http://vllm.lan:8000/v1/completions", True),
        ("https://[::1]:8443/v1/chat/completions", True),
        ("https://[::1]:8444/v1/chat/completions", False),
        ("http://gateway.lan:7000/v1", True),
        # exclude_hosts
        ("https://internal.example.com/x", False),
        ("https://a.b.corp.example/x", False),
        ("https://corp.example/x", True),  # *.suffix does not match the bare name
        ("https://api.skip.test:8443/x", False),
        ("https://api.skip.test/x", True),
        # not HTTP
        ("ftp://files.example.com/x", False),
    ],
)
def test_decision_table(url: str, routed: bool) -> None:
    router = Router()
    router.configure(CONFIG)
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert (router.route(parts.scheme, parts.hostname or "", parts.port) is not None) is routed


def test_no_config_routes_nothing() -> None:
    assert Router().route("https", "api.openai.com", None) is None


def test_refused_host_is_remembered() -> None:
    router = Router()
    router.configure(CONFIG)
    assert router.route("https", "db.internal.test", 443) is not None
    router.refused(router.key("https", "DB.internal.test", 443))
    assert router.route("https", "db.internal.test", 443) is None
    assert router.route("https", "DB.Internal.Test", None) is None
    assert router.route("https", "api.openai.com", 443) is not None


def test_refusal_of_a_named_host_says_to_start_the_proxy_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host that provider_hosts names but the proxy refuses (a proxy started by
    hand, e.g. by C{make run}, without C{--provider-host}): the warning does not tell
    the user to do what they already did, it gives the proxy's missing option."""
    router = Router()
    router.configure(CONFIG)
    with caplog.at_level("WARNING", logger="llmobserve"):
        router.refused(router.key("http", "127.0.0.1", 8080), "not_allowed: loopback")
        router.refused(router.key("https", "db.internal.test", 443), "not_allowed: private")
    named, unnamed = [r.getMessage() for r in caplog.records]
    assert "calls to http://127.0.0.1:8080 are NOT tracked" in named
    assert "restart it with --provider-host 127.0.0.1:8080=openai" in named
    assert "Name the host in provider_hosts" not in named
    assert "Name the host in provider_hosts" in unnamed


def test_unreachable_proxy_means_direct_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmobserve.sdk._routing as routing

    router = Router()
    router.configure(CONFIG)
    now = [1000.0]
    monkeypatch.setattr("llmobserve.sdk._routing.time.monotonic", lambda: now[0])
    router.unreachable(ConnectionRefusedError())
    assert router.route("https", "api.openai.com", 443) is None
    now[0] += routing.PROXY_RETRY_SECONDS + 0.1
    assert router.route("https", "api.openai.com", 443) is not None


def test_policy_refusal_needs_our_header() -> None:
    assert is_policy_refusal(403, "not_allowed")
    assert not is_policy_refusal(403, None)
    assert not is_policy_refusal(502, "upstream_unreachable")


def test_proxy_url_must_be_http() -> None:
    with pytest.raises(ValueError):
        RoutingConfig.build("https://127.0.0.1:9000")
    cfg = RoutingConfig.build("http://[::1]:9000/")
    assert cfg.endpoint == "http://[::1]:9000/proxy"
    assert cfg.authority == "[::1]:9000"
