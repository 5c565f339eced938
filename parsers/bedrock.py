"""AWS Bedrock runtime: InvokeModel, Converse and their streaming forms.

InvokeModel bodies are model-specific, but Bedrock reports the billed
counts in C{x-amzn-bedrock-*-token-count} headers (and in the last stream
chunk's C{amazon-bedrock-invocationMetrics}); Converse has a C{usage}
object. Cache reads and writes are added into C{input_tokens}.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote

from ._call import Call
from ._draft import UsageDraft, as_count
from .eventstream import read_frames
from .jsonbody import BodyError, loads

__all__ = ["parse_bedrock"]

_ENDPOINTS = {
    "invoke": "invoke",
    "invoke-with-response-stream": "invoke",
    "converse": "converse",
    "converse-stream": "converse",
}


def parse_bedrock(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from a Bedrock runtime exchange."""
    parts = call.path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "model":
        draft.model = _model_id(unquote(parts[1]))
        draft.endpoint = _ENDPOINTS.get(parts[2], parts[2])
        draft.streamed = parts[2].endswith("stream")
    else:
        draft.endpoint = parts[-1] if parts and parts[-1] else "unknown"
    headers = call.exchange.response_headers
    if draft.streamed:
        _stream(call, draft)
    elif draft.endpoint == "converse":
        try:
            body = call.json()
        except BodyError as exc:
            draft.error(str(exc))
            body = None
        if isinstance(body, dict) and isinstance(body.get("usage"), dict):
            _converse_usage(body["usage"], draft)
    if not draft.usage:
        draft.set("input_tokens", headers.get("x-amzn-bedrock-input-token-count"))
        draft.set("output_tokens", headers.get("x-amzn-bedrock-output-token-count"))
        reads = as_count(headers.get("x-amzn-bedrock-cache-read-input-token-count")) or 0
        writes = as_count(headers.get("x-amzn-bedrock-cache-write-input-token-count")) or 0
        if "input_tokens" in draft.usage and (reads or writes):
            draft.usage["input_tokens"] = int(draft.usage["input_tokens"]) + reads + writes
            if reads:
                draft.set("cached_input_tokens", reads)
            if writes:
                draft.set("cache_write_tokens", writes)
    if not draft.usage:
        draft.flag("usage_not_in_stream" if draft.streamed else "no_usage_in_response")


def _model_id(raw: str) -> str:
    """A model id from a path segment that may be an ARN (inference profiles)."""
    if raw.startswith("arn:"):
        raw = raw.rsplit("/", 1)[-1]
    return raw


def _converse_usage(usage: dict[str, Any], draft: UsageDraft) -> None:
    fresh = as_count(usage.get("inputTokens"))
    reads = as_count(usage.get("cacheReadInputTokens")) or 0
    writes = as_count(usage.get("cacheWriteInputTokens")) or 0
    if fresh is not None:
        draft.set("input_tokens", fresh + reads + writes)
    if reads:
        draft.set("cached_input_tokens", reads)
    if writes:
        draft.set("cache_write_tokens", writes)
    draft.set("output_tokens", usage.get("outputTokens"))


def _stream(call: Call, draft: UsageDraft) -> None:
    frames, problem = read_frames(call.body)
    if problem is not None:
        if problem.endswith("cut short"):
            draft.flag("stream_incomplete")
        else:
            draft.error(problem)
    for frame in frames:
        if frame.headers.get(":message-type") == "exception":
            draft.flag("stream_error_event")
            continue
        kind = frame.headers.get(":event-type")
        if kind == "metadata" and b"usage" in frame.payload:
            try:
                obj = loads(frame.payload)
            except BodyError as exc:
                draft.error(f"bad stream event: {exc}")
                continue
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                _converse_usage(obj["usage"], draft)
        elif kind == "chunk" and b"bytes" in frame.payload:
            _invoke_chunk(frame.payload, draft)


def _invoke_chunk(payload: bytes, draft: UsageDraft) -> None:
    try:
        outer = loads(payload)
        inner_raw = base64.b64decode(outer["bytes"], validate=True)
    except (BodyError, KeyError, TypeError, binascii.Error, ValueError):
        draft.error("bad invoke stream chunk")
        return
    if b"amazon-bedrock-invocationMetrics" not in inner_raw:
        return
    try:
        inner = loads(inner_raw)
    except BodyError as exc:
        draft.error(f"bad invoke stream chunk: {exc}")
        return
    metrics = inner.get("amazon-bedrock-invocationMetrics") if isinstance(inner, dict) else None
    if isinstance(metrics, dict):
        fresh = as_count(metrics.get("inputTokenCount"))
        reads = as_count(metrics.get("cacheReadInputTokenCount")) or 0
        writes = as_count(metrics.get("cacheWriteInputTokenCount")) or 0
        if fresh is not None:
            draft.set("input_tokens", fresh + reads + writes)
        if reads:
            draft.set("cached_input_tokens", reads)
        if writes:
            draft.set("cache_write_tokens", writes)
        draft.set("output_tokens", metrics.get("outputTokenCount"))
