"""parsers.worst_case stays an upper bound: checked against a count made
by walking the parsed request, for generated chat, Responses, Anthropic
Messages and Gemini bodies.

The bound reads the body's byte length, looks for part markers with a
string search and reads the output limit from the top-level object only;
the walk here reads every string and every part instead. Why its count is
an upper count of the input tokens: every token of the tokenizers in use
(byte-level BPE: OpenAI's cl100k/o200k, Anthropic's; SentencePiece with
byte fallback: Gemini's) covers at least one byte of the UTF-8 text, so
a request's text tokens are at most the UTF-8 bytes of its strings (keys
included: tool schemas are rendered into the prompt); a chat template adds
at most 4 tokens per message and 3 to prime the reply; an image part costs
at most IMAGE_PART_TOKENS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers import worst_case
from parsers._worstcase import IMAGE_PART_TOKENS
from parsers.estimate import count_tokens

WHEN = 1_750_000_000.0
#: chat templates: tokens per message, and to prime the reply
PER_MESSAGE, PRIMING = 4, 3
_IMAGE_TYPES = {"image_url", "input_image", "image"}
_IMAGE_KEYS = {"inline_data", "inlineData", "file_data", "fileData"}
_AUDIO_TYPES = {"input_audio", "audio"}


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _parts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _parts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _parts(item)


def walked_input_tokens(doc: dict[str, Any]) -> int | None:
    """The walk's count (None: an audio part, which no byte count bounds)."""
    images = 0
    for part in _parts(doc):
        kind = part.get("type")
        if kind in _AUDIO_TYPES or "input_audio" in part or "audio_url" in part:
            return None
        if kind in _IMAGE_TYPES or _IMAGE_KEYS & part.keys():
            images += 1
    messages = doc.get("messages") or doc.get("contents") or doc.get("input")
    count = len(messages) if isinstance(messages, list) else 1
    text = sum(len(s.encode("utf-8")) for s in _strings(doc))
    return text + PER_MESSAGE * count + PRIMING + IMAGE_PART_TOKENS * images


# -- generated requests -----------------------------------------------------------

TEXT = st.text(max_size=40) | st.builds(
    lambda c, n: c * n, st.characters(), st.integers(min_value=1_000, max_value=120_000)
)
URL = st.sampled_from(["https://example.com/cat.png", "https://e.x/é/ü.jpg?max_tokens=1"])
INLINE = st.builds(lambda b: "data:image/png;base64," + "QUJD" * b, st.integers(0, 50))
#: a tool whose JSON schema has "max_tokens" keys of its own, nested
TOOL = st.builds(
    lambda n: {
        "type": "function",
        "function": {
            "name": "summarise",
            "parameters": {
                "type": "object",
                "properties": {"max_tokens": {"type": "integer", "maximum": n}},
                "max_tokens": n,
            },
        },
    },
    st.integers(min_value=10**6, max_value=10**9),
)


def chat_part() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, TEXT),
        st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, URL | INLINE),
        st.just({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}),
    )


def chat_body() -> st.SearchStrategy[dict[str, Any]]:
    message = st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["system", "user", "assistant"]),
        TEXT | st.lists(chat_part(), max_size=3),
    )
    return st.builds(
        lambda messages, limit, key, n, tools: {
            "model": "gpt-4o-mini",
            "messages": messages,
            **({key: limit} if limit is not None else {}),
            **({"n": n} if n is not None else {}),
            **({"tools": tools} if tools else {}),
        },
        st.lists(message, min_size=1, max_size=6),
        st.none() | st.integers(min_value=1, max_value=20_000),
        st.sampled_from(["max_tokens", "max_completion_tokens"]),
        st.none() | st.integers(min_value=1, max_value=4),
        st.lists(TOOL, max_size=2),
    )


def responses_body() -> st.SearchStrategy[dict[str, Any]]:
    part = st.one_of(
        st.builds(lambda t: {"type": "input_text", "text": t}, TEXT),
        st.builds(lambda u: {"type": "input_image", "image_url": u}, URL | INLINE),
    )
    item = st.builds(lambda p: {"role": "user", "content": p}, st.lists(part, max_size=3))
    return st.builds(
        lambda input_, limit, tools: {
            "model": "gpt-4.1",
            "input": input_,
            **({"max_output_tokens": limit} if limit is not None else {}),
            **({"tools": tools} if tools else {}),
        },
        TEXT | st.lists(item, min_size=1, max_size=4),
        st.none() | st.integers(min_value=1, max_value=20_000),
        st.lists(TOOL, max_size=1),
    )


def messages_body() -> st.SearchStrategy[dict[str, Any]]:
    block = st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, TEXT),
        st.builds(lambda u: {"type": "image", "source": {"type": "url", "url": u}}, URL),
        st.builds(
            lambda b: {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "QUJD" * b},
            },
            st.integers(0, 50),
        ),
    )
    message = st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["user", "assistant"]),
        TEXT | st.lists(block, min_size=1, max_size=3),
    )
    return st.builds(
        lambda system, messages, limit: {
            "model": "claude-sonnet-4-20250514",
            "system": system,
            "messages": messages,
            "max_tokens": limit,
        },
        TEXT,
        st.lists(message, min_size=1, max_size=5),
        st.integers(min_value=1, max_value=20_000),
    )


def gemini_body() -> st.SearchStrategy[dict[str, Any]]:
    part = st.one_of(
        st.builds(lambda t: {"text": t}, TEXT),
        st.builds(
            lambda b: {"inline_data": {"mime_type": "image/png", "data": "QUJD" * b}},
            st.integers(0, 50),
        ),
        st.just({"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://b/cat.jpg"}}),
    )
    content = st.builds(lambda p: {"role": "user", "parts": p}, st.lists(part, max_size=3))
    return st.builds(
        lambda contents, limit: {
            "contents": contents,
            "generationConfig": {"maxOutputTokens": limit},
        },
        st.lists(content, min_size=1, max_size=4),
        st.integers(min_value=1, max_value=20_000),
    )


#: (provider, path, body)
REQUESTS = st.one_of(
    st.tuples(st.just("openai"), st.just("/v1/chat/completions"), chat_body()),
    st.tuples(st.just("openai"), st.just("/v1/responses"), responses_body()),
    st.tuples(st.just("anthropic"), st.just("/v1/messages"), messages_body()),
    st.tuples(
        st.just("gemini"),
        st.just("/v1beta/models/gemini-2.5-flash:generateContent"),
        gemini_body(),
    ),
)


def expected_output(doc: dict[str, Any]) -> int:
    """The top-level limit (times n) the generators set, else the model's maximum."""
    for key in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        if key in doc:
            return int(doc[key]) * int(doc.get("n", 1))
    if "generationConfig" in doc:
        return int(doc["generationConfig"]["maxOutputTokens"])
    return {"gpt-4o-mini": 16_384, "gpt-4.1": 32_768}[doc["model"]] * int(doc.get("n", 1))


def hostile_dumps(node: Any) -> str:
    """JSON with every ASCII letter of every key and string written as an
    escape (C{"\\u0069mage_url"}): what the provider reads is the same, and
    no part marker appears in the bytes as written."""
    if isinstance(node, dict):
        return (
            "{" + ",".join(f"{hostile_dumps(k)}:{hostile_dumps(v)}" for k, v in node.items()) + "}"
        )
    if isinstance(node, list):
        return "[" + ",".join(hostile_dumps(v) for v in node) + "]"
    if isinstance(node, str):
        return (
            '"'
            + "".join(
                f"\\u{ord(c):04x}" if c.isascii() and c.isalpha() else json.dumps(c)[1:-1]
                for c in node
            )
            + '"'
        )
    return json.dumps(node)


#: How a body is written: as any encoder does, every letter escaped (a
#: client hiding its parts), or in an encoding other than UTF-8 that JSON
#: parsers read as well (UTF-16, a BOM).
FORMS = st.sampled_from(["utf-8", "escaped", "utf-16", "utf-8-sig"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=REQUESTS, ascii_only=st.booleans(), compact=st.booleans(), form=FORMS)
def test_the_bound_is_at_least_the_walked_count(
    request: tuple[str, str, dict[str, Any]], ascii_only: bool, compact: bool, form: str
) -> None:
    """For any generated body (unicode, huge messages, images by URL and
    inline, audio, tool schemas with nested max_tokens keys), written
    compact or spaced, escaped or not, its letters written as escapes, in
    UTF-16 or with a BOM: the bound's input tokens are at least the walk's
    count, an audio part leaves it without a price, and its output tokens
    are the top-level limit, never a nested one."""
    provider, path, doc = request
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(doc, ensure_ascii=ascii_only, separators=separators)
    if form == "escaped":
        raw = hostile_dumps(doc).encode()
    else:
        raw = text.encode(form, "surrogatepass")
    bound = worst_case(provider, "api.example.com", path, raw, len(raw), WHEN)
    walked = walked_input_tokens(doc)
    if walked is None:
        assert bound.cost_usd is None and bound.reason == "audio parts cannot be bounded"
        return
    assert bound.cost_usd is not None, bound.reason
    assert bound.input_tokens is not None and bound.input_tokens >= walked
    assert bound.output_tokens == expected_output(doc)


@settings(max_examples=60, deadline=None)
@given(request=REQUESTS)
def test_the_bound_is_at_least_tiktokens_count(request: tuple[str, str, dict[str, Any]]) -> None:
    """The bound's input tokens are at least o200k's count of the body's
    text (tiktoken, a dependency, over the ranks shipped in parsers/data:
    no download), plus the chat template's per-message tokens."""
    assert count_tokens("hello world") == 2  # o200k itself, not the bytes/4 fallback
    provider, path, doc = request
    raw = json.dumps(doc).encode()
    bound = worst_case(provider, "api.example.com", path, raw, len(raw), WHEN)
    if bound.input_tokens is None:
        return
    text = sum(count_tokens(s) for s in _strings(doc))
    messages = doc.get("messages") or doc.get("contents") or doc.get("input")
    count = len(messages) if isinstance(messages, list) else 1
    assert bound.input_tokens >= text + PER_MESSAGE * count + PRIMING
