"""OpenAI and every OpenAI-compatible API: JSON bodies and SSE streams.

Chat completions, legacy completions, the Responses API, embeddings,
images, audio and moderations. Streams take usage from the last event
that carries it (whatever its C{choices}), never a sum across events.
"""

from __future__ import annotations

from typing import Any

from ._call import Call, json_or_cut_usage
from ._draft import UsageDraft, as_count, as_number, get_path
from .batches import is_batch_output, read_batch_output
from .estimate import estimate_stream_usage
from .jsonbody import BodyError, loads
from .sse import SSEEvent

__all__ = ["endpoint_for_path", "parse_openai", "read_openai_usage"]

_ENDPOINTS = (
    ("/chat/completions", "chat.completions"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
    ("/images/generations", "images.generations"),
    ("/images/edits", "images.edits"),
    ("/images/variations", "images.variations"),
    ("/audio/transcriptions", "audio.transcriptions"),
    ("/audio/translations", "audio.translations"),
    ("/audio/speech", "audio.speech"),
    ("/moderations", "moderations"),
    ("/rerank", "rerank"),
    ("/batches", "batches"),
)


#: Endpoints whose streams without usage get an estimate (C{--stream-usage}).
_ESTIMATED = frozenset({"chat.completions", "completions"})

_BY_PATH: dict[str, str | None] = {}  # paths seen (bounded: they come from the network)


def endpoint_for_path(path: str) -> str | None:
    """The OpenAI endpoint name of a request path (any prefix: /v1, /openai/deployments/x, ...)."""
    try:
        return _BY_PATH[path]
    except KeyError:
        pass
    name = _endpoint_for_path(path)
    if len(_BY_PATH) >= 1024:
        _BY_PATH.clear()
    _BY_PATH[path] = name
    return name


def _endpoint_for_path(path: str) -> str | None:
    path = path.rstrip("/")
    for suffix, name in _ENDPOINTS:
        if path.endswith(suffix):
            return name
    if "/responses/" in path:
        return "responses.retrieve"
    if "/files/" in path and path.endswith("/content"):
        return "files.content"
    return None


def parse_openai(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from an OpenAI-shaped exchange."""
    endpoint = endpoint_for_path(call.path)
    draft.endpoint = endpoint or _fallback_endpoint(call.path)
    if call.is_event_stream:
        draft.streamed = True
        _parse_stream(call, draft, endpoint)
    elif endpoint == "files.content" and is_batch_output(call.body):
        read_batch_output(call, draft, read_openai_usage)
        return
    elif endpoint == "batches" and call.exchange.method == "POST":
        draft.batch = True
        draft.unpriced_reason = "a batch is billed when it runs: priced from its results file"
        return
    elif endpoint == "audio.speech":
        _parse_speech(call, draft)
    elif call.content_type.startswith("application/json") or call.body.lstrip()[:1] == b"{":
        body = json_or_cut_usage(call, draft)
        _parse_json(call, draft, endpoint, body)
    elif endpoint in ("audio.transcriptions", "audio.translations"):
        draft.flag("no_duration_in_text_format")
    if draft.model is None:
        model = call.request_field("model") if endpoint != "audio.transcriptions" else None
        if model is None and endpoint in (
            "audio.transcriptions",
            "audio.translations",
            "images.edits",
            "images.variations",
        ):
            model = call.form_field("model")
        if isinstance(model, str):
            draft.model = model
        elif endpoint is not None and endpoint.startswith("images."):
            draft.model = "dall-e-2"  # the API's default image model
    if endpoint in ("moderations",) and not draft.usage:
        draft.estimate("requests", 1)


def _fallback_endpoint(path: str) -> str | None:
    parts = [p for p in path.split("/") if p and not p.startswith("v1")]
    return ".".join(parts[-2:]) if parts else None


def read_openai_usage(usage: object, draft: UsageDraft) -> bool:
    """Copy an OpenAI-style C{usage} (chat, completions or Responses naming) into C{draft}."""
    if not isinstance(usage, dict):
        return False
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if as_count(prompt) is None and as_count(completion) is None:
        return False
    draft.set("input_tokens", prompt)
    draft.set("output_tokens", completion)
    pdet = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cdet = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    if isinstance(pdet, dict):
        if as_count(pdet.get("cached_tokens")):
            draft.set("cached_input_tokens", pdet.get("cached_tokens"))
        if as_count(pdet.get("audio_tokens")):
            draft.set("audio_input_tokens", pdet.get("audio_tokens"))
    if "cached_input_tokens" not in draft.usage:
        # DeepSeek's naming, then Moonshot's (a top-level count, part of prompt_tokens)
        for key in ("prompt_cache_hit_tokens", "cached_tokens"):
            if as_count(usage.get(key)):
                draft.set("cached_input_tokens", usage.get(key))
                break
    if isinstance(cdet, dict):
        if as_count(cdet.get("reasoning_tokens")):
            draft.set("reasoning_tokens", cdet.get("reasoning_tokens"))
            _reasoning_beside(usage, cdet, draft)
        if as_count(cdet.get("audio_tokens")):
            draft.set("audio_output_tokens", cdet.get("audio_tokens"))
    # Costs some OpenAI-compatible APIs report themselves (OpenRouter, Perplexity).
    cost = usage.get("cost")
    if isinstance(cost, dict):
        cost = cost.get("total_cost")
    reported = as_number(cost)
    ticks = as_count(usage.get("cost_in_usd_ticks"))
    if reported is None and ticks:  # xAI: the billed amount, 10^10 ticks a dollar
        reported = ticks / _TICKS_PER_USD
    if reported is not None:
        draft.reported_cost_usd = reported
    return True


_TICKS_PER_USD = 10_000_000_000


def _reasoning_beside(usage: dict[str, Any], cdet: dict[str, Any], draft: UsageDraft) -> None:
    """xAI counts reasoning tokens beside C{completion_tokens}, not inside them
    (OpenAI and DeepSeek count them inside): C{total_tokens} then adds up to
    prompt + completion + reasoning. Both are billed as output, so the event's
    C{output_tokens} (which includes reasoning) is their sum."""
    prompt = as_count(usage.get("prompt_tokens"))
    completion = as_count(usage.get("completion_tokens"))
    reasoning = as_count(cdet.get("reasoning_tokens"))
    total = as_count(usage.get("total_tokens"))
    if prompt is None or completion is None or total is None or not reasoning:
        return
    if total == prompt + completion + reasoning:
        draft.set("output_tokens", completion + reasoning)
        draft.flag("reasoning_beside_completion")


def _parse_json(call: Call, draft: UsageDraft, endpoint: str | None, body: dict[str, Any]) -> None:
    model = body.get("model")
    if isinstance(model, str):
        draft.model = model
    rid = body.get("id")
    if isinstance(rid, str):
        draft.response_id = rid[:200]
    tier = body.get("service_tier")
    if isinstance(tier, str):
        draft.details["service_tier"] = tier
        if tier in ("flex", "priority"):
            draft.price_context["service_tier"] = tier
            draft.flag(f"pricing:service_tier={tier}")
    if "error" in body and body.get("error"):
        draft.flag("api_error")
    usage = body.get("usage")
    found = read_openai_usage(usage, draft)
    if endpoint and endpoint.startswith("images."):
        _image_usage(call, draft, body)
    elif endpoint in ("audio.transcriptions", "audio.translations"):
        seconds = as_number(body.get("duration"))
        if seconds is None and isinstance(usage, dict) and usage.get("type") == "duration":
            seconds = as_number(usage.get("seconds"))
        if seconds is not None:
            draft.set("audio_seconds", seconds)
        elif not found:
            draft.flag("no_duration_in_text_format")
    elif endpoint == "embeddings" and not found and isinstance(usage, dict):
        draft.set("input_tokens", usage.get("total_tokens"))
    elif endpoint == "responses.retrieve":
        draft.unpriced_reason = "retrieving a stored response is not billed again"
    if endpoint == "responses":
        count_tool_calls(body, draft)


def count_tool_calls(response: dict[str, Any], draft: UsageDraft) -> None:
    """Responses API: C{web_search_call} output items, billed per call."""
    output = response.get("output")
    if not isinstance(output, list):
        return
    searches = sum(
        1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call"
    )
    if searches:
        draft.tool_calls["web_search"] = searches


def _image_usage(call: Call, draft: UsageDraft, body: dict[str, Any]) -> None:
    data = body.get("data")
    if isinstance(data, list):
        draft.set("images", len(data))
    size = body.get("size") or call.request_field("size") or call.form_field("size")
    quality = body.get("quality") or call.request_field("quality") or call.form_field("quality")
    size = size if isinstance(size, str) else "1024x1024"
    quality = quality if isinstance(quality, str) else "standard"
    draft.price_item = f"{quality}/{size}"
    draft.details.update(image_size=size, image_quality=quality)


def _parse_speech(call: Call, draft: UsageDraft) -> None:
    text = call.request_field("input")
    if isinstance(text, str):
        draft.estimate("characters", len(text))
    elif call.exchange.request_body_truncated:
        draft.flag("request_truncated")


def _is_error(ev: SSEEvent) -> bool:
    return ev.event in ("error", "response.failed") or ev.data.startswith(
        (b'{"error"', b'{"type":"error"', b'{"type": "error"')
    )


def _has_usage(data: bytes) -> bool:
    return b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data


def _event_object(
    call: Call, draft: UsageDraft, data: bytes, ev: SSEEvent
) -> dict[str, Any] | None:
    try:
        obj = loads(data)
    except BodyError as exc:
        if not call.is_cut(ev):
            draft.error(f"bad stream event: {exc}")
        return None
    if not isinstance(obj, dict):
        return None
    response = obj.get("response")  # Responses API events wrap the response object
    return response if isinstance(response, dict) else obj


def _parse_stream(call: Call, draft: UsageDraft, endpoint: str | None) -> None:
    stream = call.event_stream()
    # Model and id: from the first event that names them (the first, normally).
    for i, ev in enumerate(stream.head()):
        if i >= 5:
            break
        if ev.data == b"[DONE]" or b'"model"' not in ev.data:
            continue
        inner = _event_object(call, draft, ev.data, ev)
        if inner is not None and isinstance(inner.get("model"), str):
            draft.model = inner["model"]
            if isinstance(inner.get("id"), str):
                draft.response_id = inner["id"][:200]
            break
    # Usage: the last event that carries it (whatever its choices); never a sum.
    last_usage: dict[str, Any] | None = None
    final: SSEEvent | None = None
    for ev in stream.tail():
        if final is None and not call.is_cut(ev):
            final = ev
        if _is_error(ev):  # an error ends a stream: it is among the last events
            draft.flag("stream_error_event")
        if not _has_usage(ev.data):
            continue
        inner = _event_object(call, draft, ev.data, ev)
        if inner is None:
            continue
        usage = inner.get("usage")
        if not isinstance(usage, dict):
            usage = get_path(inner, "x_groq", "usage")  # Groq puts it here in streams
        if isinstance(usage, dict):
            last_usage = usage
            if endpoint == "responses":
                count_tool_calls(inner, draft)
            tier = inner.get("service_tier")
            if isinstance(tier, str) and tier in ("flex", "priority"):
                draft.price_context["service_tier"] = tier
                draft.flag(f"pricing:service_tier={tier}")
            break
    if last_usage is not None:
        read_openai_usage(last_usage, draft)
    else:
        draft.flag("usage_not_in_stream")
    ends = (b"[DONE]",) if endpoint != "responses" else ()
    complete = final is not None and (
        final.data in ends
        or final.event in ("response.completed", "response.incomplete", "response.failed")
    )
    if not complete:
        draft.flag("stream_incomplete")
    if last_usage is None and call.estimate_usage and endpoint in _ESTIMATED:
        reason = "no usage in stream" if complete else "stream ended early, no usage"
        estimate_stream_usage(call, draft, reason)
