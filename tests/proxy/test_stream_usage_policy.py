"""C{--stream-usage}: which requests the relay rewrites, decided at header time,
and the command line that sets the modes."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python import usage

from llmobserve.proxy._headers import split_request_headers
from llmobserve.proxy._streamusage import StreamUsagePolicy, UsageInjection
from llmobserve.proxy._tap import Options

PATH = "/v1/chat/completions"


def head(*extra: tuple[bytes, bytes], length: int | None = 100) -> Any:
    pairs = [(b"Content-Type", b"application/json"), *extra]
    if length is not None:
        pairs.append((b"Content-Length", b"%d" % length))
    return split_request_headers(pairs)


def plan(policy: StreamUsagePolicy, **kw: Any) -> UsageInjection | None:
    args: dict[str, Any] = {
        "method": b"POST",
        "path": PATH,
        "host": "api.openai.com",
        "port": 443,
        "hint": None,
        "head": head(),
    }
    args.update(kw)
    return policy.plan(**args)


def test_openai_is_injected_by_default_and_the_others_are_not() -> None:
    policy = StreamUsagePolicy()
    assert plan(policy) is not None
    assert plan(policy, host="api.groq.com") is None  # OpenAI-compatible: opt-in
    assert plan(policy, host="example.com") is None
    assert plan(policy, host="10.0.0.5", hint="openai") is not None  # base-URL mode


def test_only_streamable_posts_are_planned() -> None:
    policy = StreamUsagePolicy()
    assert plan(policy, method=b"GET") is None
    assert plan(policy, path="/v1/embeddings") is None
    assert plan(policy, path="/v1/completions") is not None


def test_hosts_declared_openai_are_injected() -> None:
    policy = StreamUsagePolicy(provider_hosts={"llm.internal:8080": "openai"})
    assert plan(policy, host="llm.internal", port=8080) is not None
    assert plan(policy, host="llm.internal", port=8081) is None


def test_opt_in_and_opt_out() -> None:
    policy = StreamUsagePolicy({"azure_openai": "inject", "openai": "off"})
    assert plan(policy) is None
    assert plan(policy, host="x.openai.azure.com", hint="azure_openai") is not None
    assert policy.no_estimate == frozenset({"openai"})
    with pytest.raises(ValueError):
        StreamUsagePolicy({"openai": "sometimes"})


def test_bodies_over_the_bound_or_compressed_are_not_held() -> None:
    policy = StreamUsagePolicy(body_bound=1000)
    assert plan(policy, head=head(length=1000)) is not None
    assert plan(policy, head=head(length=1001)) is None
    assert plan(policy, head=head(length=0)) is None
    assert plan(policy, head=head((b"Content-Encoding", b"gzip"))) is None
    chunked = head((b"Transfer-Encoding", b"chunked"), length=None)
    assert plan(policy, head=chunked) is not None


def test_an_injection_holds_up_to_the_bound_then_lets_go() -> None:
    body = b'{"stream":true,"messages":[]}'
    injection = UsageInjection(bound=len(body))
    assert injection.hold(body) is None and injection.holding
    assert injection.finish() == b'{"stream_options":{"include_usage":true},' + body[1:]
    assert injection.content_length == len(body) + 40
    pairs = [(b"Accept-Encoding", b"gzip"), (b"X-A", b"1")]
    assert injection.forward_headers(pairs) == [(b"X-A", b"1"), (b"Accept-Encoding", b"identity")]
    sse = [(b"Content-Type", b"text/event-stream")]
    assert injection.response_filter(200, sse) is not None
    assert injection.response_filter(400, sse) is None
    assert injection.response_filter(200, [*sse, (b"Content-Encoding", b"gzip")]) is None

    over = UsageInjection(bound=4)
    assert over.hold(b"abc") is None
    assert over.hold(b"de") == b"abcde" and not over.holding
    assert over.content_length is None and over.response_filter(200, sse) is None


def parse(*argv: str) -> Any:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_the_stream_usage_option() -> None:
    options = parse("--stream-usage", "azure_openai=inject", "--stream-usage", "openai=off")
    assert options["stream-usage"] == {"azure_openai": "inject", "openai": "off"}
    assert parse()["stream-usage"] == {}
    with pytest.raises(usage.UsageError):
        parse("--stream-usage", "openai=always")
