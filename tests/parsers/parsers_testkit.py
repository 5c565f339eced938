"""Helpers for the parser tests: build an Exchange, and provider-shaped bodies."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from parsers import Exchange

#: 2024-09-01T00:00:00Z: every fixture is priced at this date unless it says otherwise.
SEPT_2024 = 1725148800.0


def exchange(
    host: str,
    path: str,
    response: bytes | Mapping[str, Any] | list[Any] = b"",
    *,
    request: bytes | Mapping[str, Any] | None = None,
    method: str = "POST",
    status: int = 200,
    query: str = "",
    content_type: str | None = None,
    response_headers: Mapping[str, str] | None = None,
    request_headers: Mapping[str, str] | None = None,
    started_at: float = SEPT_2024,
    hint: str | None = None,
    response_truncated: bool = False,
    request_truncated: bool = False,
) -> Exchange:
    """An Exchange with JSON bodies encoded and sensible headers."""
    if isinstance(response, (Mapping, list)):
        body = json.dumps(response).encode()
        ctype = content_type or "application/json"
    else:
        body = bytes(response)
        ctype = content_type or "application/json"
    if request is None:
        req = b""
    elif isinstance(request, (Mapping, list)):
        req = json.dumps(request).encode()
    else:
        req = bytes(request)
    rh = {"content-type": ctype, **(response_headers or {})}
    qh = {"content-type": "application/json", **(request_headers or {})}
    return Exchange(
        method=method,
        scheme="https",
        host=host,
        port=443,
        path=path,
        query=query,
        request_headers=qh,
        request_body=req,
        request_body_truncated=request_truncated,
        status=status,
        response_headers=rh,
        response_body=body,
        response_body_truncated=response_truncated,
        started_at=started_at,
        provider_hint=hint,
    )


def sse(events: Iterable[Mapping[str, Any] | str | tuple[str, Mapping[str, Any]]]) -> bytes:
    """An event stream: dicts become C{data: <json>}, (name, dict) adds C{event: name}."""
    out = []
    for ev in events:
        if isinstance(ev, tuple):
            name, data = ev
            out.append(f"event: {name}\ndata: {json.dumps(data)}\n\n")
        elif isinstance(ev, str):
            out.append(f"data: {ev}\n\n")
        else:
            out.append(f"data: {json.dumps(ev, separators=(',', ':'))}\n\n")
    return "".join(out).encode()


def openai_chat_stream(n_chunks: int = 200, *, usage_on_last_content: bool = False) -> bytes:
    """A chat stream shaped like OpenAI's with C{stream_options.include_usage}."""
    base = {
        "id": "chatcmpl-AbC123",
        "object": "chat.completion.chunk",
        "created": 1725148800,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_483d39d857",
    }
    events: list[Any] = []
    events.append(
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
    )
    for i in range(n_chunks):
        events.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": f" tok{i}"},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                "usage": None,
            }
        )
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": n_chunks,
        "total_tokens": 1200 + n_chunks,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if usage_on_last_content:
        events.append(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    else:
        events.append(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                "usage": None,
            }
        )
        events.append({**base, "choices": [], "usage": usage})
    events.append("[DONE]")
    return sse(events)


CHAT_COMPLETION = {
    "id": "chatcmpl-9xYz",
    "object": "chat.completion",
    "created": 1725148800,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_483d39d857",
}

PINECONE_QUERY = {
    "results": [],
    "matches": [
        {"id": f"vec-{i}", "score": 0.9 - i / 100, "values": [], "metadata": {"genre": "drama"}}
        for i in range(10)
    ],
    "namespace": "ns1",
    "usage": {"readUnits": 6},
}


def checking_construct(construct: Callable[..., Any]) -> Callable[..., Any]:
    """construct(), asserting that it equals cls(**fields) field for field."""

    def check(cls: type[Any], /, **fields: Any) -> Any:
        fast, plain = construct(cls, **fields), cls(**fields)
        assert list(vars(fast)) == [f.name for f in dataclasses.fields(cls)]
        assert vars(fast) == vars(plain) and fast == plain and repr(fast) == repr(plain)
        return fast

    return check
