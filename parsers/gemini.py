"""Google Gemini (generativelanguage) and Vertex AI: JSON, streamed JSON arrays and SSE.

C{usageMetadata} is cumulative in every streamed chunk; the last one wins.
Thinking tokens (C{thoughtsTokenCount}) are billed as output, so they are
counted in C{output_tokens} and also shown as C{reasoning_tokens}.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from ._call import Call, json_or_cut_usage
from ._draft import UsageDraft, as_count
from .jsonbody import BodyError, loads, raw_decode_prefix
from .sse import SSEEvent

__all__ = ["model_from_path", "parse_gemini"]

_MODEL_RE = re.compile(r"/(?:publishers/([^/]+)/)?models/([^/:]+)(?::([A-Za-z]+))?")


def model_from_path(path: str) -> tuple[str | None, str | None, str | None]:
    """(publisher, model, method) from C{.../models/MODEL:method} paths."""
    match = _MODEL_RE.search(path)
    if match is None:
        return None, None, None
    return match.group(1), unquote(match.group(2)), match.group(3)


_METHODS = {
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "embedContent": "embed_content",
    "batchEmbedContents": "embed_content",
    "countTokens": "count_tokens",
    "predict": "predict",
    "rawPredict": "messages",
    "streamRawPredict": "messages",
}


def parse_gemini(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from a Gemini / Vertex AI exchange."""
    publisher, model, method = model_from_path(call.path)
    if publisher == "anthropic":  # Claude on Vertex AI speaks the Messages API
        from .anthropic import parse_anthropic

        parse_anthropic(call, draft)
        draft.model = draft.model or model
        return
    if "/openai/" in call.path:  # the OpenAI-compatible surface
        from .openai import parse_openai

        parse_openai(call, draft)
        return
    draft.model = model
    draft.endpoint = _METHODS.get(method or "", method)
    if method == "countTokens":
        draft.unpriced_reason = "token counting is free"
    chunks: list[Any]
    if call.is_event_stream:
        draft.streamed = True
        chunks = _sse_chunks(call, draft)
    elif method == "streamGenerateContent":
        draft.streamed = True
        chunks = _array_chunks(call, draft)
    else:
        chunks = [json_or_cut_usage(call, draft, ("usageMetadata",))]
    last: dict[str, Any] | None = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        meta = chunk.get("usageMetadata")
        if isinstance(meta, dict):
            last = meta
        version = chunk.get("modelVersion")
        if isinstance(version, str):
            draft.model = version
        rid = chunk.get("responseId")
        if isinstance(rid, str):
            draft.response_id = rid[:200]
        if "error" in chunk:
            draft.flag("api_error")
        if method == "predict":
            _predict_usage(chunk, draft)
        _count_grounding(chunk, draft)
    if last is not None:
        _read_usage(last, draft)
    elif method == "embedContent" or method == "batchEmbedContents":
        draft.flag("no_usage_in_response")
    elif method != "predict":
        draft.flag("usage_not_in_stream" if draft.streamed else "no_usage_in_response")


def _read_usage(meta: dict[str, Any], draft: UsageDraft) -> None:
    prompt = as_count(meta.get("promptTokenCount")) or 0
    tool_prompt = as_count(meta.get("toolUsePromptTokenCount")) or 0
    candidates = as_count(meta.get("candidatesTokenCount")) or 0
    thoughts = as_count(meta.get("thoughtsTokenCount")) or 0
    draft.set("input_tokens", prompt + tool_prompt)
    draft.set("output_tokens", candidates + thoughts)
    if thoughts:
        draft.set("reasoning_tokens", thoughts)
    cached = as_count(meta.get("cachedContentTokenCount"))
    if cached:
        draft.set("cached_input_tokens", cached)
    for key, target in (
        ("promptTokensDetails", "audio_input_tokens"),
        ("candidatesTokensDetails", "audio_output_tokens"),
    ):
        details = meta.get(key)
        if isinstance(details, list):
            for item in details:
                if isinstance(item, dict) and item.get("modality") == "AUDIO":
                    draft.set(target, item.get("tokenCount"))


def _count_grounding(chunk: dict[str, Any], draft: UsageDraft) -> None:
    """Grounding with Google Search: Gemini 2.x bills it per grounded prompt,
    so a grounded response counts one; the queries it ran are kept in
    C{details} (a stream repeats its metadata: the most seen is kept).
    """
    candidates = chunk.get("candidates")
    if not isinstance(candidates, list):
        return
    for candidate in candidates:
        meta = candidate.get("groundingMetadata") if isinstance(candidate, dict) else None
        if not isinstance(meta, dict):
            continue
        draft.tool_calls["grounding"] = 1
        queries = meta.get("webSearchQueries")
        if isinstance(queries, list):
            seen = draft.details.get("grounding_queries", 0)
            draft.details["grounding_queries"] = max(seen, len(queries))


def _predict_usage(chunk: dict[str, Any], draft: UsageDraft) -> None:
    """Vertex C{:predict} for text embeddings: token counts per prediction."""
    predictions = chunk.get("predictions")
    if not isinstance(predictions, list):
        return
    total = 0
    found = False
    for item in predictions[:10000]:
        stats = item.get("embeddings", {}).get("statistics") if isinstance(item, dict) else None
        if isinstance(stats, dict) and as_count(stats.get("token_count")) is not None:
            total += as_count(stats.get("token_count")) or 0
            found = True
    if found:
        draft.set("input_tokens", total)
        draft.endpoint = "embeddings"


def _sse_chunks(call: Call, draft: UsageDraft) -> list[Any]:
    # Usage is cumulative: only the last chunk carrying it matters, but model
    # and id come early. Parse the first event, then from the end the last
    # one that parses with usage.
    stream = call.event_stream()
    chunks: list[Any] = []
    first: SSEEvent | None = None
    for ev in stream.head():
        first = ev
        chunks.extend(_try_loads(call, draft, ev))
        break
    for ev in stream.tail():
        if ev == first:
            break
        if b'"usageMetadata"' in ev.data:
            parsed = _try_loads(call, draft, ev)
            if parsed and isinstance(parsed[0], dict):
                if isinstance(parsed[0].get("usageMetadata"), dict):
                    chunks.extend(parsed)
                    break
    return chunks


def _try_loads(call: Call, draft: UsageDraft, ev: SSEEvent) -> list[Any]:
    try:
        return [loads(ev.data)]
    except BodyError as exc:
        if not call.is_cut(ev):
            draft.error(f"bad stream event: {exc}")
        return []


def _array_chunks(call: Call, draft: UsageDraft) -> list[Any]:
    """The elements of a streamed JSON array, as many as are complete."""
    try:
        value = call.json()
        return value if isinstance(value, list) else [value]
    except BodyError:
        pass
    try:
        text = call.body.decode("utf-8", "replace")
    except Exception:  # pragma: no cover - decode with replace cannot fail
        return []
    chunks: list[Any] = []
    pos = text.find("[")
    if pos < 0:
        draft.error("streamed response is not a JSON array")
        return chunks
    pos += 1
    length = len(text)
    while pos < length:
        while pos < length and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= length or text[pos] == "]":
            break
        try:
            value, pos = raw_decode_prefix(text, pos)
        except BodyError as exc:
            if not call.body_truncated:
                draft.error(f"bad stream element: {exc}")
            draft.flag("stream_incomplete")
            break
        chunks.append(value)
    else:
        draft.flag("stream_incomplete")
    return chunks
