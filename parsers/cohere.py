"""Cohere: chat (v1 and v2), embed, rerank; JSON, SSE (v2) and NDJSON (v1) streams.

Cohere bills C{billed_units}; that is what usage reports when present
(C{tokens} otherwise). Rerank bills search units (C{requests} here).
"""

from __future__ import annotations

from typing import Any

from ._call import Call, json_or_cut_usage
from ._draft import UsageDraft, get_path
from .jsonbody import BodyError, loads

__all__ = ["parse_cohere"]


def _endpoint(path: str) -> str:
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    return {
        "chat": "chat",
        "embed": "embed",
        "rerank": "rerank",
        "generate": "generate",
        "classify": "classify",
        "tokenize": "tokenize",
        "detokenize": "detokenize",
    }.get(tail, tail or "unknown")


def parse_cohere(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from a Cohere exchange."""
    draft.endpoint = _endpoint(call.path)
    if draft.endpoint in ("tokenize", "detokenize"):
        draft.unpriced_reason = "tokenizing is free"
    final: dict[str, Any] | None = None
    if call.is_event_stream:
        draft.streamed = True
        for ev in call.event_stream().tail():
            if ev.event not in ("message-end", "message") or b'"usage"' not in ev.data:
                continue
            try:
                obj = loads(ev.data)
            except BodyError as exc:
                if not call.is_cut(ev):
                    draft.error(f"bad stream event: {exc}")
                continue
            usage = get_path(obj, "delta", "usage")
            if isinstance(usage, dict):
                final = {"usage": usage}
                break
        if final is None:
            draft.flag("usage_not_in_stream")
    elif call.request_field("stream") is True or call.content_type.startswith(
        ("application/stream+json", "application/x-ndjson")
    ):
        draft.streamed = True
        for line in call.body.splitlines():
            if b"stream-end" not in line:
                continue
            try:
                obj = loads(line)
            except BodyError:
                draft.flag("stream_incomplete")
                continue
            response = obj.get("response") if isinstance(obj, dict) else None
            if isinstance(response, dict):
                final = response
        if final is None:
            draft.flag("usage_not_in_stream")
    else:
        final = json_or_cut_usage(call, draft, ("usage", "meta"))
    if final is not None:
        _read(final, draft)
    if draft.model is None:
        model = call.request_field("model")
        if isinstance(model, str):
            draft.model = model


def _read(body: dict[str, Any], draft: UsageDraft) -> None:
    rid = body.get("id") or body.get("generation_id") or body.get("response_id")
    if isinstance(rid, str):
        draft.response_id = rid[:200]
    usage = body.get("usage") or body.get("meta")
    if not isinstance(usage, dict):
        return
    billed = usage.get("billed_units")
    tokens = usage.get("tokens")
    source = billed if isinstance(billed, dict) else tokens if isinstance(tokens, dict) else None
    if source is None:
        return
    draft.set("input_tokens", source.get("input_tokens"))
    draft.set("output_tokens", source.get("output_tokens"))
    if source.get("search_units") is not None:
        draft.set("requests", source.get("search_units"))
    if source.get("images") is not None:
        draft.set("images", source.get("images"))
