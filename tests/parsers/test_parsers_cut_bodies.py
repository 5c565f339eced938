"""Responses longer than the copy the proxy keeps for parsing (its head and
its tail): never parsed as JSON, their usage still found at their end."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from parsers_testkit import exchange
from test_parsers_llm_providers import MESSAGE

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


def test_a_long_anthropic_message_is_priced_from_its_tail() -> None:
    """The same usage and cost as the whole body gives."""
    long = {**MESSAGE, "content": [{"type": "text", "text": "word " * 50_000}]}
    body, request = json.dumps(long).encode(), {"model": MESSAGE["model"]}
    whole = analyse(exchange("api.anthropic.com", "/v1/messages", body, request=request))
    record = analyse(_cut_exchange("api.anthropic.com", "/v1/messages", body, request))
    assert record.usage_source == whole.usage_source == "reported"
    assert record.usage == whole.usage and record.usage["output_tokens"] == 300
    assert record.cost_usd == whole.cost_usd and record.cost_usd is not None
    assert "usage_from_cut_body" in record.flags


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


def test_a_cut_body_is_never_parsed_as_json() -> None:
    """It fails at once: a megabyte of JSON that cannot parse once held a
    parse thread (and the GIL) for milliseconds."""
    big = _cut(_embeddings(2000, None))
    call = Call(exchange("api.openai.com", "/v1/embeddings", big, response_truncated=True), None)
    start = time.perf_counter()
    for method in (call.json, call.json_object):
        with pytest.raises(BodyError, match="cut"):
            method()
    assert time.perf_counter() - start < 0.01
    assert call.last_objects("usage")["usage"] == {"prompt_tokens": 812, "total_tokens": 812}


def test_a_whole_body_is_parsed_and_searched_for_nothing() -> None:
    body = _embeddings(2, None)
    call = Call(exchange("api.openai.com", "/v1/embeddings", body), None)
    assert call.json()["usage"]["total_tokens"] == 812
    assert call.last_objects("usage") == {}


def test_a_whole_body_that_is_not_json_still_says_so() -> None:
    record = analyse(exchange("api.openai.com", "/v1/embeddings", b'{"object": "list", "data": ['))
    assert record.parse_error is not None and "invalid JSON" in record.parse_error
