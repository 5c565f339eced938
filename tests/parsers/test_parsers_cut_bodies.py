"""Responses longer than the copy the proxy keeps for parsing (its head and
its tail): never parsed as JSON, their usage still found at their end."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parsers_testkit import exchange
from test_parsers_llm_providers import COHERE_V2, GEMINI, MESSAGE

from llmobserve.proxy._bodytap import BodyTap
from parsers import Exchange, analyse
from parsers._call import Call
from parsers.jsonbody import BodyError

HEAD, TAIL = 64 * 1024, 16 * 1024  # the proxy keeps 1 MiB and 256 KiB; smaller here


def _cut(body: bytes) -> bytes:
    """What the proxy hands the parsers for a response of C{body}."""
    tap = BodyTap(HEAD, TAIL)
    for i in range(0, len(body), 4096):
        tap.add(body[i : i + 4096])
    assert tap.truncated
    return tap.value()


def _embeddings(n: int, indent: int | None) -> bytes:
    return json.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.0123456789] * 256}
                for i in range(n)
            ],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 812, "total_tokens": 812},
        },
        indent=indent,
    ).encode()


def _cut_exchange(host: str, path: str, body: bytes, request: dict[str, Any]) -> Exchange:
    return exchange(host, path, _cut(body), request=request, response_truncated=True)


@pytest.mark.parametrize("indent", [None, 2], ids=["compact", "pretty"])
def test_a_long_embeddings_batch_is_priced_from_its_tail(indent: int | None) -> None:
    body = _embeddings(100, indent)
    assert len(body) > 4 * (HEAD + TAIL)
    record = analyse(
        _cut_exchange("api.openai.com", "/v1/embeddings", body, {"model": "text-embedding-3-small"})
    )
    assert record.usage_source == "reported"
    assert record.usage == {"input_tokens": 812}
    assert record.model == "text-embedding-3-small"
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.parse_error is None
    assert {"parse_truncated", "usage_from_cut_body"} <= set(record.flags)


_LONG = "word " * 50_000
#: (host, path, a response whose bulk precedes its usage, the request)
_PROVIDERS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "anthropic": (
        "api.anthropic.com",
        "/v1/messages",
        {**MESSAGE, "content": [{"type": "text", "text": _LONG}]},
        {"model": MESSAGE["model"]},
    ),
    "gemini": (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {**GEMINI, "candidates": [{"content": {"parts": [{"text": _LONG}], "role": "model"}}]},
        {},
    ),
    "cohere-v2": (
        "api.cohere.com",
        "/v2/chat",
        {**COHERE_V2, "message": {"role": "assistant", "content": [{"text": _LONG}]}},
        {"model": "command-r-plus-08-2024"},
    ),
    "cohere-v1": (
        "api.cohere.com",
        "/v1/chat",
        {"text": _LONG, "meta": {"billed_units": {"input_tokens": 11, "output_tokens": 22}}},
        {"model": "command-r-plus"},
    ),
}


@pytest.mark.parametrize("provider", sorted(_PROVIDERS))
def test_a_long_response_is_priced_as_its_whole_body_would_be(provider: str) -> None:
    """The usage found at the end of the kept copy gives the same usage and
    cost as the whole body does."""
    host, path, response, request = _PROVIDERS[provider]
    body = json.dumps(response).encode()
    whole = analyse(exchange(host, path, body, request=request))
    record = analyse(_cut_exchange(host, path, body, request))
    assert whole.usage and whole.cost_usd is not None, whole
    assert record.usage_source == whole.usage_source == "reported"
    assert record.usage == whole.usage
    assert record.cost_usd == whole.cost_usd
    assert record.parse_error is None
    assert {"parse_truncated", "usage_from_cut_body"} <= set(record.flags)


def test_usage_quoted_inside_a_string_is_not_taken_for_the_real_one() -> None:
    """The only "usage" in the tail is text the model wrote (escaped in
    JSON): nothing is recovered, and the event says why."""
    text = "x" * (HEAD + TAIL) + ' "usage": {"prompt_tokens": 999999} ' * 10
    body = json.dumps({"model": "gpt-4o-mini", "choices": [{"message": {"content": text}}]})
    record = analyse(
        _cut_exchange(
            "api.openai.com", "/v1/chat/completions", body.encode(), {"model": "gpt-4o-mini"}
        )
    )
    assert record.usage_source != "reported" and "prompt_tokens" not in str(record.usage)
    assert record.parse_error is not None and "cut" in record.parse_error
    assert "usage_from_cut_body" not in record.flags


def test_a_cut_body_is_never_parsed_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """It fails at once, without handing the body to the JSON parser: a
    megabyte of JSON that cannot parse once held a parse thread (and the
    GIL) for milliseconds."""
    import parsers._call

    def never(*_: Any) -> Any:
        raise AssertionError("a cut body went to the JSON parser")

    monkeypatch.setattr(parsers._call, "loads", never)
    monkeypatch.setattr(parsers._call, "loads_object", never)
    big = _cut(_embeddings(2000, None))
    call = Call(exchange("api.openai.com", "/v1/embeddings", big, response_truncated=True), None)
    for method in (call.json, call.json_object):
        with pytest.raises(BodyError, match="cut"):
            method()
    assert call.last_objects("usage")["usage"] == {"prompt_tokens": 812, "total_tokens": 812}


def test_a_whole_body_is_parsed_and_searched_for_nothing() -> None:
    body = _embeddings(2, None)
    call = Call(exchange("api.openai.com", "/v1/embeddings", body), None)
    assert call.json()["usage"]["total_tokens"] == 812
    assert call.last_objects("usage") == {}


def test_a_whole_body_that_is_not_json_still_says_so() -> None:
    record = analyse(exchange("api.openai.com", "/v1/embeddings", b'{"object": "list", "data": ['))
    assert record.parse_error is not None and "invalid JSON" in record.parse_error
