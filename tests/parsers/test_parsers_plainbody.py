"""parsers._plainbody: the requests of text only, which the budget check
bounds in one pass (their bytes and their output limit), told apart from
every request with a part, a tool the provider runs, or a field of any
other kind."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from parsers import worst_case
from parsers._plainbody import decode_plain
from parsers._worstcase import _worst_case_any, worst_case_fields

WHEN = 1_750_000_000.0

_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}

#: text requests of each provider's API, as their SDKs write them
TEXT_REQUESTS: dict[str, dict[str, Any]] = {
    "chat": {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": "d", "parameters": _SCHEMA},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
        "max_completion_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
        "temperature": 0.2,
        "top_p": 1,
        "stop": ["\n\n"],
        "seed": 7,
        "logit_bias": {"50256": -100},
        "metadata": {"feature": "weather"},
        "service_tier": "flex",
        "user": "u-1",
    },
    "messages": {
        "model": "claude-haiku-4-5",
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "x"}],
                    },
                ],
            },
        ],
        "tools": [{"name": "weather", "description": "d", "input_schema": _SCHEMA}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "max_tokens": 2048,
        "top_k": 5,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
    },
    "responses": {
        "model": "gpt-4.1",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "message", "role": "user", "content": "In Paris."},
        ],
        "tools": [{"type": "function", "name": "weather", "parameters": _SCHEMA, "strict": True}],
        "reasoning": {"effort": "low"},
        "max_output_tokens": 300,
        "store": False,
    },
    "responses, input as a string": {"model": "gpt-4.1", "input": "hi", "max_output_tokens": 9},
}


@pytest.mark.parametrize("name", TEXT_REQUESTS)
def test_text_requests_of_each_provider_are_plain(name: str) -> None:
    """Chat, Messages and Responses requests of text (system prompts, text
    parts, function tools and their calls and results) decode, with their
    model and output limit as written."""
    doc = TEXT_REQUESTS[name]
    top = decode_plain(json.dumps(doc).encode())
    assert top.model == doc["model"]
    limits = (top.max_tokens, top.max_completion_tokens, top.max_output_tokens)
    assert [x for x in limits if x is not msgspec.UNSET] == [
        doc[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if k in doc
    ]


def _chat_with(part: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [part]}],
    }


#: a part of each kind that costs more than its bytes, or whose cost no byte count bounds
PARTS: dict[str, Any] = {
    "image_url": {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
    "input_image": {"type": "input_image", "image_url": "https://x/a.png"},
    "image": {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
    "input_audio": {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    "file": {"type": "file", "file": {"file_id": "file-1"}},
    "input_file": {"type": "input_file", "file_id": "file-1"},
    "document": {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
    "inline_data": {"inline_data": {"mime_type": "image/png", "data": "AAAA"}},
    "a text part with an image beside it": {
        "type": "text",
        "text": "hi",
        "image_url": {"url": "https://x/a.png"},
    },
    "a tool result with an image": {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}],
    },
    "a server tool's call passed back": {
        "type": "server_tool_use",
        "id": "s1",
        "name": "web_search",
        "input": {},
    },
}

#: requests with something other than text, by what they have
OTHER_REQUESTS: dict[str, Any] = {
    **{f"part {name}": _chat_with(part) for name, part in PARTS.items()},
    "n choices": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [], "n": 2},
    "audio output": {"model": "gpt-4o-audio", "messages": [], "audio": {"voice": "alloy"}},
    "an unknown field": {"model": "gpt-4o-mini", "messages": [], "attachments": []},
    "a provider-run tool": {"model": "gpt-4.1", "input": "hi", "tools": [{"type": "web_search"}]},
    "an Anthropic server tool": {
        "model": "claude-haiku-4-5",
        "messages": [],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    },
    "a Gemini tool": {"model": "x", "messages": [], "tools": [{"googleSearch": {}}]},
    "a tool choice of a hosted tool": {
        "model": "gpt-4.1",
        "input": "hi",
        "tool_choice": {"type": "web_search_preview"},
    },
    "a stored item by id": {"model": "gpt-4.1", "input": [{"id": "msg_1"}]},
    "an item reference": {"model": "gpt-4.1", "input": [{"type": "item_reference", "id": "m"}]},
    "a reasoning item": {"model": "gpt-4.1", "input": [{"type": "reasoning", "id": "rs_1"}]},
    "the priority tier": {"model": "gpt-4o-mini", "messages": [], "service_tier": "priority"},
    "a JSON schema response format": {
        "model": "gpt-4o-mini",
        "messages": [],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
    },
    "Gemini contents": {"contents": [{"parts": [{"text": "hi"}]}]},
    "not an object": ["gpt-4o-mini"],
    **{
        f"a model named by {what}": {"model": value, "max_tokens": 5, "messages": []}
        for what, value in (("a number", 4), ("an object", {"id": "m"}), ("a list", ["m"]))
    },
    **{
        f"{key} of {what}": {"model": "gpt-4o-mini", key: value, "messages": []}
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens")
        for what, value in (("-1", -1), ("1.5", 1.5), ("10.0", 10.0), ("null", None), ("'9'", "9"))
    },
    "a model of null": {"model": None, "max_tokens": 5, "messages": []},
}


@pytest.mark.parametrize("name", OTHER_REQUESTS)
def test_any_other_request_is_refused(name: str) -> None:
    """A part of any kind, a tool the provider runs (or its call passed
    back), input it holds by id, n choices, the priority tier, a field the
    schema does not name: refused, so the full way reads it."""
    with pytest.raises(msgspec.ValidationError):
        decode_plain(json.dumps(OTHER_REQUESTS[name]).encode())


def test_a_part_behind_an_escape_or_a_repeated_key_is_refused() -> None:
    """The decoder reads keys and values as the provider does: a part type
    written with escapes is still that type, and each value of a repeated
    key is checked (a provider may read the first, or the last)."""
    escaped = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":'
        b'[{"type":"\\u0069mage_url","\\u0069mage_url":{"url":"https://x/a.png"}}]}]}'
    )
    image = b'[{"type":"image_url","image_url":{"url":"https://x/a.png"}}]'
    first = b'{"model":"m","messages":[{"role":"user","content":%s,"content":"hi"}]}' % image
    last = b'{"model":"m","messages":[{"role":"user","content":"hi","content":%s}]}' % image
    for body in (escaped, first, last):
        with pytest.raises(msgspec.ValidationError):
            decode_plain(body)


def test_a_body_not_in_utf8_is_not_decoded() -> None:
    """UTF-16, a BOM: the full way reads them (as rewritten in UTF-8)."""
    text = json.dumps(TEXT_REQUESTS["chat"])
    for raw in (text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode()):
        with pytest.raises(msgspec.DecodeError):
            decode_plain(raw)


def test_a_prompt_that_quotes_a_part_is_bounded_as_text() -> None:
    """A message whose text is a part's JSON (a prompt about the API) is
    text: both ways bound it at its bytes, where a search of the raw body
    for part markers counted an image (or found audio, and no bound)."""
    for quoted in ("image_url", "input_audio", '{"type": "image_url", "image_url": {"url": "u"}}'):
        doc = {
            "model": "gpt-4o-mini",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": quoted}],
        }
        raw = json.dumps(doc).encode()
        args = ("openai", "api.example.com", "/v1/chat/completions", raw, len(raw), WHEN)
        full = _worst_case_any(*args)
        assert full[2] is not None and full[3] == len(raw) + 1_000, (quoted, full)
        assert worst_case_fields(*args) == full


def test_each_text_request_is_bounded_in_one_pass_as_the_full_way_bounds_it() -> None:
    """The budget check's one pass and the full way give the same figures
    for each provider's text request (tools, calls and results included)."""
    for name, doc in TEXT_REQUESTS.items():
        provider = "anthropic" if name == "messages" else "openai"
        raw = json.dumps(doc).encode()
        args = (provider, "api.example.com", "/v1/x", raw, len(raw), WHEN)
        full = _worst_case_any(*args)
        assert full[2] is not None, (name, full)
        assert worst_case_fields(*args) == full
        assert worst_case(*args).input_tokens == len(raw) + 1_000


def test_what_the_typed_fields_refuse_is_bounded_the_full_way() -> None:
    """A model that is not a string, an output limit that is not a whole
    number from 0 up: the one pass refuses them, and
    the budget check gets the full way's figures (no bound, or the
    model's maximum output)."""
    names = [n for n in OTHER_REQUESTS if n.startswith(("a model ", "max_"))]
    assert len(names) == 19
    for name in names:
        raw = json.dumps(OTHER_REQUESTS[name]).encode()
        args = ("openai", "api.example.com", "/v1/chat/completions", raw, len(raw), WHEN)
        assert worst_case_fields(*args) == _worst_case_any(*args), name


def test_a_limit_past_64_bits_is_read_exactly() -> None:
    """A whole number of any size is a limit (no float, no refusal)."""
    raw = b'{"model":"gpt-4o-mini","max_tokens":%d,"messages":[]}' % (2**70)
    assert decode_plain(raw).max_tokens == 2**70
