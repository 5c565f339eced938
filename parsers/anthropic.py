"""Anthropic Messages API (direct, and on Vertex AI / Bedrock in the same shape).

Anthropic's C{input_tokens} excludes cache reads and writes; here
C{input_tokens} is normalised to all prompt tokens, with
C{cached_input_tokens} (reads) and C{cache_write_tokens} as subsets.
Streams merge C{message_start} (input side) with the cumulative
C{message_delta} usage (output side, and input fields when present).
"""

from __future__ import annotations

from typing import Any

from ._call import Call, json_or_cut_usage
from ._draft import UsageDraft, as_count
from .batches import is_batch_output, read_batch_output
from .jsonbody import BodyError, loads
from .sse import SSEEvent

__all__ = ["parse_anthropic", "read_anthropic_usage"]

_USAGE_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def _endpoint(path: str) -> str:
    path = path.rstrip("/")
    if path.endswith("/messages"):
        return "messages"
    if path.endswith("/count_tokens"):
        return "messages.count_tokens"
    if path.endswith("/complete"):
        return "complete"
    if "/batches" in path:
        return "messages.batches"
    if path.endswith(":rawPredict") or path.endswith(":streamRawPredict"):
        return "messages"
    return path.rsplit("/", 1)[-1] or "unknown"


def parse_anthropic(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from an Anthropic-shaped exchange (JSON or SSE)."""
    draft.endpoint = _endpoint(call.path)
    if draft.endpoint == "messages.count_tokens":
        draft.unpriced_reason = "token counting is free"
    if draft.endpoint == "messages.batches" and is_batch_output(call.body):
        read_batch_output(call, draft, read_anthropic_usage)
        return
    if draft.endpoint == "messages.batches" and call.exchange.method == "POST":
        draft.batch = True
        draft.unpriced_reason = "a batch is billed when it runs: priced from its results file"
    if call.is_event_stream:
        draft.streamed = True
        _parse_stream(call, draft)
    else:
        body = json_or_cut_usage(call, draft)
        if body.get("type") == "error":
            draft.flag("api_error")
        _message_fields(body, draft)
        usage = body.get("usage")
        if draft.endpoint == "messages.count_tokens":
            draft.set("input_tokens", body.get("input_tokens"))
        elif isinstance(usage, dict):
            read_anthropic_usage(usage, draft)
    if draft.model is None:
        model = call.request_field("model")
        if isinstance(model, str):
            draft.model = model


def _message_fields(message: dict[str, Any], draft: UsageDraft) -> None:
    model = message.get("model")
    if isinstance(model, str):
        draft.model = model
    mid = message.get("id")
    if isinstance(mid, str):
        draft.response_id = mid[:200]


def read_anthropic_usage(usage: dict[str, Any], draft: UsageDraft) -> None:
    """Normalise an Anthropic C{usage} object into C{draft}."""
    fresh = as_count(usage.get("input_tokens"))
    write = as_count(usage.get("cache_creation_input_tokens")) or 0
    read = as_count(usage.get("cache_read_input_tokens")) or 0
    if fresh is not None or write or read:
        draft.set("input_tokens", (fresh or 0) + write + read)
        if read:
            draft.set("cached_input_tokens", read)
        if write:
            draft.set("cache_write_tokens", write)
    draft.set("output_tokens", usage.get("output_tokens"))
    creation = usage.get("cache_creation")
    if isinstance(creation, dict) and as_count(creation.get("ephemeral_1h_input_tokens")):
        # 1-hour cache writes cost more than 5-minute ones: a subset of the writes
        draft.set("cache_write_1h_tokens", creation.get("ephemeral_1h_input_tokens"))
    server = usage.get("server_tool_use")
    searches = as_count(server.get("web_search_requests")) if isinstance(server, dict) else None
    if searches:
        draft.details["web_search_requests"] = searches
        draft.tool_calls["web_search"] = searches
    tier = usage.get("service_tier")
    if isinstance(tier, str):
        draft.details["service_tier"] = tier
        if tier == "batch":  # a message inside a batch's results: half price
            draft.batch = True


_CONTENT_EVENTS = frozenset({"content_block_delta", "content_block_start", "content_block_stop"})


def _parse_stream(call: Call, draft: UsageDraft) -> None:
    stream = call.event_stream()
    start: dict[str, Any] = {}
    deltas: list[dict[str, Any]] = []
    stopped = False
    # message_start opens the stream; message_delta events close it, after every content block.
    for ev in stream.head():
        if ev.event in _CONTENT_EVENTS:
            break
        obj = _event(call, draft, ev)
        if obj is not None and obj.get("type") == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                _message_fields(message, draft)
                usage = message.get("usage")
                if isinstance(usage, dict):
                    start = usage
            break
    for ev in stream.tail():
        if ev.event in _CONTENT_EVENTS or ev.event == "message_start":
            break
        if ev.event == "message_stop":
            stopped = True
            continue
        if ev.event == "ping":
            continue
        obj = _event(call, draft, ev)
        if obj is None:
            continue
        kind = obj.get("type")
        if kind == "error":  # e.g. overloaded_error inside a 200 stream; it ends the stream
            draft.flag("stream_error_event")
            err = obj.get("error")
            if isinstance(err, dict) and isinstance(err.get("type"), str):
                draft.details["stream_error"] = err["type"][:80]
        if kind == "message_delta" and isinstance(obj.get("usage"), dict):
            deltas.append(obj["usage"])
        elif kind == "message_stop":
            stopped = True
        elif kind == "message_start":
            break
    merged = {k: v for k, v in start.items() if v is not None}
    for usage in reversed(deltas):  # oldest first: cumulative figures replace, never add
        merged.update({k: v for k, v in usage.items() if v is not None})
    if merged:
        read_anthropic_usage(merged, draft)
    else:
        draft.flag("usage_not_in_stream")
    if not stopped:
        draft.flag("stream_incomplete")


def _event(call: Call, draft: UsageDraft, ev: SSEEvent) -> dict[str, Any] | None:
    try:
        obj = loads(ev.data)
    except BodyError as exc:
        if not call.is_cut(ev):
            draft.error(f"bad stream event: {exc}")
        return None
    return obj if isinstance(obj, dict) else None
