"""Anthropic, Gemini / Vertex AI, Cohere and Bedrock: JSON and streamed shapes."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import pytest
from parsers_testkit import exchange, sse

from parsers import analyse

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-sonnet-20241022",
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 100,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 5000,
        "output_tokens": 300,
    },
}


def anthropic_stream(deltas: int = 50, *, stop: bool = True) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-3-5-sonnet-20241022",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 100,
                "cache_creation_input_tokens": 2000,
                "cache_read_input_tokens": 5000,
                "output_tokens": 1,
            },
        },
    }
    events: list[Any] = [
        ("message_start", start),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    events += [
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f"w{i} "},
            },
        )
        for i in range(deltas)
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 300},
            },
        ),
    ]
    if stop:
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(events)


def test_anthropic_json_normalises_cache_tokens() -> None:
    """input_tokens = fresh + cache writes + cache reads; reads and writes are subsets."""
    record = analyse(exchange("api.anthropic.com", "/v1/messages", MESSAGE))
    assert record.endpoint == "messages"
    assert record.usage == {
        "input_tokens": 7100,
        "cached_input_tokens": 5000,
        "cache_write_tokens": 2000,
        "output_tokens": 300,
    }
    expected = (100 * 3 + 5000 * 0.3 + 2000 * 3.75 + 300 * 15) / 1e6
    assert record.cost_usd == pytest.approx(expected, rel=1e-12)
    assert record.price_ref == "genai-prices:anthropic/claude-3-5-sonnet@2024-09-01"


def test_anthropic_stream_merges_start_and_delta() -> None:
    """message_start gives the input side, message_delta the cumulative output."""
    record = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages",
            anthropic_stream(),
            content_type="text/event-stream",
        )
    )
    assert record.streamed
    assert record.usage == {
        "input_tokens": 7100,
        "cached_input_tokens": 5000,
        "cache_write_tokens": 2000,
        "output_tokens": 300,
    }
    assert record.flags == ()
    assert record.model == "claude-3-5-sonnet-20241022"


def test_anthropic_stream_newer_delta_with_input_fields() -> None:
    """Newer message_delta events repeat input fields: the latest figure replaces."""
    body = anthropic_stream().replace(
        b'"usage": {"output_tokens": 300}',
        b'"usage": {"input_tokens": 100, "cache_creation_input_tokens": 2000, '
        b'"cache_read_input_tokens": 5000, "output_tokens": 300}',
    )
    record = analyse(
        exchange("api.anthropic.com", "/v1/messages", body, content_type="text/event-stream")
    )
    assert record.usage["input_tokens"] == 7100
    assert record.usage["output_tokens"] == 300


def test_anthropic_stream_cut_after_start_keeps_input() -> None:
    """Cut before message_delta: the input side is known, output is the start's figure."""
    body = anthropic_stream(stop=False)
    body = body[: body.index(b"event: message_delta")]
    record = analyse(
        exchange("api.anthropic.com", "/v1/messages", body, content_type="text/event-stream")
    )
    assert record.usage["input_tokens"] == 7100
    assert record.usage["output_tokens"] == 1
    assert "stream_incomplete" in record.flags


def test_anthropic_overloaded_error_in_stream() -> None:
    """An overloaded_error event inside a 200 stream is flagged and named."""
    body = anthropic_stream(stop=False) + sse(
        [
            (
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            )
        ]
    )
    record = analyse(
        exchange("api.anthropic.com", "/v1/messages", body, content_type="text/event-stream")
    )
    assert "stream_error_event" in record.flags
    assert record.details["stream_error"] == "overloaded_error"


def test_claude_on_vertex() -> None:
    """Claude on Vertex AI (rawPredict) is read as the Messages API and priced."""
    body = {**MESSAGE, "model": "claude-3-5-sonnet-v2@20241022"}
    path = (
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
        "claude-3-5-sonnet-v2@20241022:rawPredict"
    )
    record = analyse(exchange("us-east5-aiplatform.googleapis.com", path, body))
    assert record.provider == "vertex_ai"
    assert record.usage["input_tokens"] == 7100
    assert record.cost_usd is not None


GEMINI = {
    "candidates": [
        {
            "content": {"parts": [{"text": "Hi"}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 1000,
        "candidatesTokenCount": 200,
        "totalTokenCount": 1700,
        "thoughtsTokenCount": 500,
        "cachedContentTokenCount": 400,
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "abc",
}


def test_gemini_json_thinking_counts_as_output() -> None:
    """thoughtsTokenCount is billed as output: in output_tokens and reasoning_tokens."""
    record = analyse(
        exchange(
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            GEMINI,
        )
    )
    assert record.endpoint == "generate_content"
    assert record.usage == {
        "input_tokens": 1000,
        "cached_input_tokens": 400,
        "output_tokens": 700,
        "reasoning_tokens": 500,
    }
    assert record.cost_usd is not None and record.cost_usd > 0


def _gemini_chunks(n: int) -> list[dict[str, Any]]:
    return [
        {
            "candidates": [{"content": {"parts": [{"text": f"t{i}"}], "role": "model"}}],
            "usageMetadata": {
                "promptTokenCount": 10,
                "candidatesTokenCount": i + 1,
                "totalTokenCount": 11 + i,
            },
            "modelVersion": "gemini-1.5-flash-002",
        }
        for i in range(n)
    ]


def test_gemini_sse_stream_last_usage() -> None:
    """?alt=sse: cumulative usageMetadata, the last one wins."""
    record = analyse(
        exchange(
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-1.5-flash:streamGenerateContent",
            sse(_gemini_chunks(30)),
            query="alt=sse",
            content_type="text/event-stream",
        )
    )
    assert record.streamed
    assert record.usage == {"input_tokens": 10, "output_tokens": 30}
    assert record.model == "gemini-1.5-flash-002"


def test_gemini_json_array_stream_and_truncation() -> None:
    """The default stream is one JSON array; cut short, the complete elements count."""
    chunks = _gemini_chunks(5)
    body = ("[" + ",\r\n".join(json.dumps(c) for c in chunks) + "]").encode()
    path = "/v1beta/models/gemini-1.5-flash:streamGenerateContent"
    whole = analyse(exchange("generativelanguage.googleapis.com", path, body))
    assert whole.usage == {"input_tokens": 10, "output_tokens": 5}
    cut = analyse(exchange("generativelanguage.googleapis.com", path, body[:-40]))
    assert cut.usage == {"input_tokens": 10, "output_tokens": 4}
    assert "stream_incomplete" in cut.flags


def test_vertex_gemini() -> None:
    """Vertex AI publisher path for Gemini."""
    path = (
        "/v1/projects/p/locations/us-central1/publishers/google/models/"
        "gemini-2.0-flash-001:generateContent"
    )
    record = analyse(
        exchange(
            "us-central1-aiplatform.googleapis.com",
            path,
            {**GEMINI, "modelVersion": "gemini-2.0-flash-001"},
        )
    )
    assert record.provider == "vertex_ai"
    assert record.model == "gemini-2.0-flash-001"
    assert record.cost_usd is not None


COHERE_V2 = {
    "id": "c14c80c3",
    "finish_reason": "COMPLETE",
    "message": {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]},
    "usage": {
        "billed_units": {"input_tokens": 5, "output_tokens": 418},
        "tokens": {"input_tokens": 71, "output_tokens": 418},
    },
}


@pytest.mark.parametrize(
    ("path", "body", "request_body", "usage"),
    [
        (
            "/v2/chat",
            COHERE_V2,
            {"model": "command-r-plus-08-2024"},
            {"input_tokens": 5, "output_tokens": 418},
        ),
        (
            "/v1/chat",
            {
                "text": "Hi",
                "generation_id": "g",
                "meta": {
                    "api_version": {"version": "1"},
                    "billed_units": {"input_tokens": 11, "output_tokens": 22},
                },
            },
            {"model": "command-r-plus"},
            {"input_tokens": 11, "output_tokens": 22},
        ),
    ],
)
def test_cohere(
    path: str, body: dict[str, Any], request_body: dict[str, Any], usage: dict[str, Any]
) -> None:
    """Cohere bills billed_units: that is the usage; each is priced."""
    record = analyse(exchange("api.cohere.com", path, body, request=request_body))
    assert record.usage == usage
    assert record.cost_usd is not None and record.cost_usd > 0, record.price_ref


@pytest.mark.parametrize(
    ("path", "body", "request_body", "usage"),
    [
        (
            "/v2/embed",
            {
                "id": "e",
                "embeddings": {"float": [[0.1]]},
                "texts": ["x"],
                "meta": {"billed_units": {"input_tokens": 3}},
            },
            {"model": "embed-english-v3.0"},
            {"input_tokens": 3},
        ),
        (
            "/v2/rerank",
            {"id": "r", "results": [], "meta": {"billed_units": {"search_units": 1}}},
            {"model": "rerank-v3.5"},
            {"requests": 1},
        ),
    ],
)
def test_cohere_embed_and_rerank_unpriced(
    path: str, body: dict[str, Any], request_body: dict[str, Any], usage: dict[str, Any]
) -> None:
    """Cohere embed v3 and rerank: their usage is read, but no price for them
    could be traced to Cohere's pricing page (issue 16), so none is guessed."""
    record = analyse(exchange("api.cohere.com", path, body, request=request_body))
    assert record.usage == usage
    assert record.cost_usd is None
    assert record.price_ref == f"unknown model: {request_body['model']}"


def test_cohere_v2_stream() -> None:
    """v2 SSE: usage on message-end."""
    body = sse(
        [
            ("message-start", {"type": "message-start", "id": "x"}),
            ("content-delta", {"type": "content-delta", "delta": {"message": {}}}),
            (
                "message-end",
                {
                    "type": "message-end",
                    "delta": {
                        "finish_reason": "COMPLETE",
                        "usage": {
                            "billed_units": {"input_tokens": 9, "output_tokens": 4},
                            "tokens": {"input_tokens": 70, "output_tokens": 4},
                        },
                    },
                },
            ),
        ]
    )
    record = analyse(
        exchange(
            "api.cohere.com",
            "/v2/chat",
            body,
            request={"model": "command-r-plus", "stream": True},
            content_type="text/event-stream",
        )
    )
    assert record.streamed and record.usage == {"input_tokens": 9, "output_tokens": 4}


def test_cohere_v1_ndjson_stream() -> None:
    """v1 streams are NDJSON; stream-end carries the final response."""
    lines = [
        {"is_finished": False, "event_type": "text-generation", "text": "Hi"},
        {
            "is_finished": True,
            "event_type": "stream-end",
            "finish_reason": "COMPLETE",
            "response": {
                "generation_id": "g",
                "meta": {"billed_units": {"input_tokens": 6, "output_tokens": 2}},
            },
        },
    ]
    body = "\n".join(json.dumps(x) for x in lines).encode()
    record = analyse(
        exchange(
            "api.cohere.com",
            "/v1/chat",
            body,
            request={"model": "command-r", "stream": True},
            content_type="application/stream+json",
        )
    )
    assert record.usage == {"input_tokens": 6, "output_tokens": 2}


def test_bedrock_converse() -> None:
    """Converse usage; cache reads/writes added into input_tokens."""
    body = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hi"}]}},
        "stopReason": "end_turn",
        "usage": {
            "inputTokens": 100,
            "outputTokens": 50,
            "totalTokens": 350,
            "cacheReadInputTokens": 200,
            "cacheWriteInputTokens": 0,
        },
        "metrics": {"latencyMs": 300},
    }
    path = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    record = analyse(exchange("bedrock-runtime.us-east-1.amazonaws.com", path, body))
    assert record.endpoint == "converse"
    assert record.model == "anthropic.claude-3-5-sonnet-20240620-v1:0"
    assert record.usage == {"input_tokens": 300, "cached_input_tokens": 200, "output_tokens": 50}
    assert record.cost_usd is not None


def test_bedrock_invoke_headers() -> None:
    """InvokeModel bodies are model-specific; Bedrock's count headers are the usage."""
    record = analyse(
        exchange(
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "/model/amazon.nova-pro-v1:0/invoke",
            {"output": {}},
            response_headers={
                "x-amzn-bedrock-input-token-count": "120",
                "x-amzn-bedrock-output-token-count": "30",
            },
        )
    )
    assert record.usage == {"input_tokens": 120, "output_tokens": 30}
    assert record.cost_usd is not None


def _frame(event_type: str, payload: bytes) -> bytes:
    headers = b""
    for name, value in (
        (":event-type", event_type),
        (":message-type", "event"),
        (":content-type", "application/json"),
    ):
        raw = value.encode()
        headers += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def test_bedrock_converse_stream_eventstream() -> None:
    """ConverseStream's binary event-stream: usage from the metadata event."""
    body = (
        _frame("messageStart", b'{"role":"assistant"}')
        + _frame("contentBlockDelta", b'{"delta":{"text":"Hi"},"contentBlockIndex":0}')
        + _frame("messageStop", b'{"stopReason":"end_turn"}')
        + _frame(
            "metadata",
            json.dumps(
                {
                    "usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18},
                    "metrics": {"latencyMs": 5},
                }
            ).encode(),
        )
    )
    path = "/model/anthropic.claude-3-haiku-20240307-v1:0/converse-stream"
    record = analyse(
        exchange(
            "bedrock-runtime.us-west-2.amazonaws.com",
            path,
            body,
            content_type="application/vnd.amazon.eventstream",
        )
    )
    assert record.streamed
    assert record.usage == {"input_tokens": 11, "output_tokens": 7}
    cut = analyse(
        exchange(
            "bedrock-runtime.us-west-2.amazonaws.com",
            path,
            body[:-10],
            content_type="application/vnd.amazon.eventstream",
        )
    )
    assert "stream_incomplete" in cut.flags and cut.parse_error is None


def test_bedrock_invoke_stream_metrics() -> None:
    """InvokeModelWithResponseStream: the last chunk's invocation metrics."""
    inner = {
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": 40,
            "outputTokenCount": 12,
            "invocationLatency": 1,
            "firstByteLatency": 1,
        },
    }
    chunk = json.dumps({"bytes": base64.b64encode(json.dumps(inner).encode()).decode()}).encode()
    body = _frame(
        "chunk", json.dumps({"bytes": base64.b64encode(b'{"type":"x"}').decode()}).encode()
    ) + _frame("chunk", chunk)
    path = "/model/anthropic.claude-3-haiku-20240307-v1:0/invoke-with-response-stream"
    record = analyse(exchange("bedrock-runtime.us-east-1.amazonaws.com", path, body))
    assert record.usage == {"input_tokens": 40, "output_tokens": 12}


def test_bedrock_bad_crc_is_a_parse_error() -> None:
    """A corrupted event-stream frame is recorded, not raised."""
    frame = bytearray(_frame("metadata", b'{"usage":{"inputTokens":1,"outputTokens":1}}'))
    frame[-1] ^= 0xFF
    record = analyse(
        exchange(
            "bedrock-runtime.us-east-1.amazonaws.com", "/model/x/converse-stream", bytes(frame)
        )
    )
    assert record.parse_error is not None and "CRC" in record.parse_error
