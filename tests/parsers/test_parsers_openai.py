"""OpenAI and OpenAI-compatible APIs: one row per provider and endpoint."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parsers_testkit import CHAT_COMPLETION, exchange, openai_chat_stream, sse

from parsers import analyse

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
RESPONSES = {
    "id": "resp_67ccd2bed1ec8190",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "model": "o3-mini-2025-01-31",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 64},
        "total_tokens": 123,
    },
}
COMPLETIONS = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {
            "text": "\n\nThis is indeed a test",
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
AUDIO_CHAT = {
    **CHAT_COMPLETION,
    "model": "gpt-4o-audio-preview-2025-06-03",
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 200,
        "total_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 150},
    },
}

CASES: list[tuple[str, str, str, Any, dict[str, Any], dict[str, Any]]] = [
    # (host, path, endpoint, response, request, expected usage)
    (
        "api.openai.com",
        "/v1/chat/completions",
        "chat.completions",
        CHAT_COMPLETION,
        {},
        {"input_tokens": 1200, "cached_input_tokens": 1024, "output_tokens": 300},
    ),
    (
        "api.openai.com",
        "/v1/completions",
        "completions",
        COMPLETIONS,
        {},
        {"input_tokens": 5, "output_tokens": 7},
    ),
    (
        "api.openai.com",
        "/v1/responses",
        "responses",
        RESPONSES,
        {},
        {"input_tokens": 36, "output_tokens": 87, "reasoning_tokens": 64},
    ),
    ("api.openai.com", "/v1/embeddings", "embeddings", EMBEDDINGS, {}, {"input_tokens": 8}),
    (
        "api.openai.com",
        "/v1/chat/completions",
        "chat.completions",
        AUDIO_CHAT,
        {},
        {
            "input_tokens": 100,
            "output_tokens": 200,
            "audio_input_tokens": 60,
            "audio_output_tokens": 150,
        },
    ),
    (
        "myco.openai.azure.com",
        "/openai/deployments/prod-4o/chat/completions",
        "chat.completions",
        {**CHAT_COMPLETION, "model": "gpt-4o-2024-08-06"},
        {},
        {"input_tokens": 1200, "cached_input_tokens": 1024, "output_tokens": 300},
    ),
    (
        "api.deepseek.com",
        "/chat/completions",
        "chat.completions",
        {
            "id": "x",
            "object": "chat.completion",
            "model": "deepseek-chat",
            "choices": [],
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 10,
                "total_tokens": 110,
                "prompt_cache_hit_tokens": 64,
                "prompt_cache_miss_tokens": 36,
            },
        },
        {},
        {"input_tokens": 100, "cached_input_tokens": 64, "output_tokens": 10},
    ),
    (
        "api.groq.com",
        "/openai/v1/chat/completions",
        "chat.completions",
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "llama-3.1-8b-instant",
            "choices": [],
            "usage": {
                "queue_time": 0.01,
                "prompt_tokens": 20,
                "prompt_time": 0.001,
                "completion_tokens": 30,
                "completion_time": 0.02,
                "total_tokens": 50,
                "total_time": 0.021,
            },
        },
        {},
        {"input_tokens": 20, "output_tokens": 30},
    ),
    (
        "api.mistral.ai",
        "/v1/chat/completions",
        "chat.completions",
        {
            "id": "cmpl-e5cc",
            "object": "chat.completion",
            "model": "mistral-large-latest",
            "choices": [],
            "usage": {"prompt_tokens": 16, "completion_tokens": 34, "total_tokens": 50},
        },
        {},
        {"input_tokens": 16, "output_tokens": 34},
    ),
    (
        "api.x.ai",
        "/v1/chat/completions",
        "chat.completions",
        {**CHAT_COMPLETION, "model": "grok-2-1212"},
        {},
        {"input_tokens": 1200, "cached_input_tokens": 1024, "output_tokens": 300},
    ),
    (
        "api.voyageai.com",
        "/v1/embeddings",
        "embeddings",
        {"object": "list", "data": [], "model": "voyage-3", "usage": {"total_tokens": 10}},
        {},
        {"input_tokens": 10},
    ),
    (
        "api.ai21.com",
        "/studio/v1/chat/completions",
        "chat.completions",
        {
            "id": "x",
            "model": "jamba-large-1.7",
            "choices": [],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
        },
        {},
        {"input_tokens": 1000, "output_tokens": 100},
    ),
]


@pytest.mark.parametrize(("host", "path", "endpoint", "response", "request_body", "usage"), CASES)
def test_json_endpoints(
    host: str,
    path: str,
    endpoint: str,
    response: Any,
    request_body: dict[str, Any],
    usage: dict[str, Any],
) -> None:
    """Usage is read from each provider's JSON shape and priced (never a silent zero)."""
    record = analyse(exchange(host, path, response, request=request_body or None))
    assert record.endpoint == endpoint
    assert dict(record.usage) == usage
    assert record.usage_source == "reported"
    assert record.parse_error is None
    assert record.cost_usd is not None and record.cost_usd > 0, record.price_ref
    assert record.price_ref


def test_chat_cost_is_exact() -> None:
    """gpt-4o-mini: uncached input at $0.15/M, cached at $0.075/M, output at $0.60/M."""
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", CHAT_COMPLETION))
    expected = (176 * 0.15 + 1024 * 0.075 + 300 * 0.6) / 1e6
    assert record.cost_usd == pytest.approx(expected, rel=1e-12)
    assert record.price_ref == "genai-prices:openai/gpt-4o-mini@2024-09-01"
    assert record.model == "gpt-4o-mini-2024-07-18"
    assert record.response_id == "chatcmpl-9xYz"
    assert record.cost_breakdown is not None
    assert sum(record.cost_breakdown.values()) == pytest.approx(record.cost_usd)


def test_audio_preview_priced_from_our_table() -> None:
    """genai-prices lacks audio-token rates for gpt-4o-audio-preview: our table supplies them."""
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", AUDIO_CHAT))
    expected = (40 * 2.5 + 60 * 40 + 50 * 10 + 150 * 80) / 1e6
    assert record.cost_usd == pytest.approx(expected, rel=1e-12)
    assert record.price_ref == "llmobserve:openai/gpt-4o-audio-preview-2025-06-03"


def test_openrouter_reported_cost_wins() -> None:
    """When the API reports its own cost (OpenRouter usage.cost), that is the cost."""
    body = {
        "id": "gen-1",
        "model": "openai/gpt-4o-mini",
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "cost": 0.0000123,
        },
    }
    record = analyse(exchange("openrouter.ai", "/api/v1/chat/completions", body))
    assert record.cost_usd == 0.0000123
    assert record.price_ref == "reported:openrouter"


def test_perplexity_cost_object() -> None:
    """Perplexity's usage.cost object: total_cost is the reported cost."""
    body = {
        "id": "x",
        "model": "sonar",
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 30,
            "search_context_size": "low",
            "cost": {
                "input_tokens_cost": 0.00001,
                "output_tokens_cost": 0.00002,
                "request_cost": 0.005,
                "total_cost": 0.00503,
            },
        },
    }
    record = analyse(exchange("api.perplexity.ai", "/chat/completions", body))
    assert record.cost_usd == 0.00503


@pytest.mark.parametrize(
    ("model", "quality", "size", "n", "price"),
    [
        ("dall-e-3", "hd", "1024x1792", 1, 0.12),
        ("dall-e-3", "standard", "1024x1024", 2, 0.08),
        ("dall-e-2", None, "512x512", 3, 0.054),
    ],
)
def test_image_generations(
    model: str, quality: str | None, size: str, n: int, price: float
) -> None:
    """Images: count from the response, size and quality from the request, per-image price."""
    request: dict[str, Any] = {"model": model, "prompt": "a cat", "n": n, "size": size}
    if quality:
        request["quality"] = quality
    response = {"created": 1725148800, "data": [{"url": "https://x/img.png"}] * n}
    record = analyse(
        exchange("api.openai.com", "/v1/images/generations", response, request=request)
    )
    assert record.endpoint == "images.generations"
    assert record.usage == {"images": n}
    assert record.model == model
    assert record.cost_usd == pytest.approx(price)
    assert "llmobserve:openai/" in (record.price_ref or "")


def test_image_edit_multipart_defaults_to_dall_e_2() -> None:
    """Edits are multipart; model and size come from the form fields."""
    boundary = "XyZ"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="size"\r\n\r\n256x256\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n\x89PNG\r\n--{boundary}--\r\n"
    ).encode()
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/images/edits",
            {"created": 1, "data": [{"url": "u"}]},
            request=form,
            request_headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    )
    assert record.model == "dall-e-2"
    assert record.cost_usd == pytest.approx(0.016)


def test_speech_counts_input_characters() -> None:
    """TTS bills the characters of the input text: estimated from the request, priced."""
    text = "Today is a wonderful day to build something people love!"
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/audio/speech",
            b"\xff\xfbMP3DATA",
            request={"model": "tts-1", "input": text, "voice": "alloy"},
            content_type="audio/mpeg",
        )
    )
    assert record.usage == {"characters": len(text)}
    assert record.usage_source == "estimated"
    assert record.estimated_keys == ("characters",)
    assert record.cost_usd == pytest.approx(len(text) * 15 / 1e6)


def test_transcription_verbose_json_duration() -> None:
    """verbose_json carries the duration: whisper-1 at $0.006 a minute."""
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'
    body = {
        "task": "transcribe",
        "language": "english",
        "duration": 90.0,
        "text": "hello",
        "segments": [],
    }
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/audio/transcriptions",
            body,
            request=form,
            request_headers={"content-type": "multipart/form-data; boundary=b"},
        )
    )
    assert record.usage == {"audio_seconds": 90.0}
    assert record.cost_usd == pytest.approx(0.009)


def test_transcription_text_format_has_no_duration() -> None:
    """response_format=text carries no duration: usage missing, cost null, never 0."""
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/audio/transcriptions",
            b"hello world\n",
            content_type="text/plain; charset=utf-8",
            request=form,
            request_headers={"content-type": "multipart/form-data; boundary=b"},
        )
    )
    assert record.model == "whisper-1"
    assert record.usage_source == "missing"
    assert record.cost_usd is None
    assert record.price_ref == "no usage reported"


def test_moderations_are_free_and_say_so() -> None:
    """Moderation is free: cost 0 with a price_ref saying so (an explicit, not silent, zero)."""
    body = {"id": "modr-1", "model": "omni-moderation-latest", "results": [{"flagged": False}]}
    record = analyse(exchange("api.openai.com", "/v1/moderations", body))
    assert record.cost_usd == 0.0
    assert record.price_ref is not None and "free" in record.price_ref


def test_unknown_model_gives_null_cost_and_reason() -> None:
    """A model nobody prices: cost_usd None and price_ref 'unknown model: ...'."""
    body = {**CHAT_COMPLETION, "model": "my-finetune-xyz"}
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", body))
    assert record.cost_usd is None
    assert record.price_ref == "unknown model: my-finetune-xyz"
    assert record.usage_source == "reported"


def test_flex_service_tier_selects_flex_prices() -> None:
    """service_tier=flex in the response selects genai-prices's flex variant."""
    from datetime import UTC, datetime

    from genai_prices import Usage, calc_price

    body = {
        **CHAT_COMPLETION,
        "model": "o3-2025-04-16",
        "service_tier": "flex",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
    }
    record = analyse(
        exchange("api.openai.com", "/v1/chat/completions", body, started_at=1760000000.0)
    )
    when = datetime.fromtimestamp(1760000000.0, UTC)
    flex = calc_price(
        Usage(input_tokens=1000, output_tokens=1000),
        "o3-2025-04-16",
        provider_id="openai",
        genai_request_timestamp=when,
        price_context={"service_tier": "flex"},
    )
    assert record.cost_usd == float(flex.total_price)


# --- streams -------------------------------------------------------------------------


def test_chat_stream_usage_from_last_chunk() -> None:
    """include_usage stream: the final chunk (empty choices) carries the usage."""
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            openai_chat_stream(200),
            content_type="text/event-stream",
        )
    )
    assert record.streamed
    assert record.usage == {"input_tokens": 1200, "cached_input_tokens": 1024, "output_tokens": 200}
    assert record.flags == ()
    assert record.model == "gpt-4o-mini-2024-07-18"


def test_usage_on_a_chunk_with_choices_is_taken() -> None:
    """Some OpenAI-compatible servers put usage on the last content chunk: still taken."""
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            openai_chat_stream(20, usage_on_last_content=True),
            content_type="text/event-stream",
        )
    )
    assert record.usage["output_tokens"] == 20


def test_cumulative_usage_is_never_summed() -> None:
    """Servers that send cumulative usage on every chunk: the last one, not the sum."""
    events = [
        {
            "id": "c",
            "model": "llama-3.1-8b-instant",
            "choices": [{"delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": i, "total_tokens": 10 + i},
        }
        for i in range(1, 6)
    ] + ["[DONE]"]
    record = analyse(
        exchange(
            "api.groq.com",
            "/openai/v1/chat/completions",
            sse(events),
            content_type="text/event-stream",
        )
    )
    assert record.usage == {"input_tokens": 10, "output_tokens": 5}


def test_groq_x_groq_usage() -> None:
    """Groq streams put usage under x_groq.usage on the final chunk."""
    events: list[dict[str, Any] | str] = [
        {"id": "c", "model": "llama-3.1-8b-instant", "choices": [{"delta": {"content": "x"}}]},
        {
            "id": "c",
            "model": "llama-3.1-8b-instant",
            "choices": [],
            "x_groq": {
                "id": "req_1",
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            },
        },
        "[DONE]",
    ]
    record = analyse(
        exchange(
            "api.groq.com",
            "/openai/v1/chat/completions",
            sse(events),
            content_type="text/event-stream",
        )
    )
    assert record.usage == {"input_tokens": 7, "output_tokens": 3}


def test_stream_without_usage_is_missing_not_zero() -> None:
    """No stream_options.include_usage and --stream-usage openai=off: usage
    missing, flagged, cost null; otherwise estimated (and labelled so)."""
    events: list[dict[str, Any] | str] = [
        {"id": "c", "model": "gpt-4o-mini", "choices": [{"delta": {"content": "x"}}]},
        "[DONE]",
    ]
    ex = exchange(
        "api.openai.com", "/v1/chat/completions", sse(events), content_type="text/event-stream"
    )
    record = analyse(ex, no_estimate={"openai"})
    assert record.usage_source == "missing"
    assert record.cost_usd is None
    assert "usage_not_in_stream" in record.flags
    estimated = analyse(ex)
    assert estimated.usage_source == "estimated" and estimated.usage["output_tokens"] == 1
    assert "usage_not_in_stream" in estimated.flags


def test_stream_cut_short_keeps_what_was_seen() -> None:
    """A stream that ends without [DONE] is flagged incomplete; usage seen is kept."""
    body = openai_chat_stream(10)
    cut = body[: body.rindex(b"data: [DONE]")]
    record = analyse(
        exchange("api.openai.com", "/v1/chat/completions", cut, content_type="text/event-stream")
    )
    assert record.usage["output_tokens"] == 10
    assert "stream_incomplete" in record.flags
    assert record.parse_error is None


def test_stream_error_event_flagged() -> None:
    """An error event inside a 200 stream is flagged."""
    events: list[dict[str, Any] | str] = [
        {"id": "c", "model": "gpt-4o-mini", "choices": [{"delta": {"content": "x"}}]},
        {"error": {"message": "server overloaded", "type": "server_error"}},
    ]
    record = analyse(
        exchange(
            "api.openai.com", "/v1/chat/completions", sse(events), content_type="text/event-stream"
        )
    )
    assert "stream_error_event" in record.flags


def test_responses_stream() -> None:
    """Responses API stream: usage from response.completed, model from response.created."""
    created = {
        "type": "response.created",
        "response": {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-4.1-2025-04-14",
            "status": "in_progress",
            "usage": None,
        },
    }
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"}
    done = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-4.1-2025-04-14",
            "status": "completed",
            "usage": {
                "input_tokens": 50,
                "input_tokens_details": {"cached_tokens": 10},
                "output_tokens": 20,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 70,
            },
        },
    }
    body = sse(
        [("response.created", created)]
        + [("response.output_text.delta", delta)] * 30
        + [("response.completed", done)]
    )
    record = analyse(
        exchange("api.openai.com", "/v1/responses", body, content_type="text/event-stream")
    )
    assert record.endpoint == "responses"
    assert record.model == "gpt-4.1-2025-04-14"
    assert record.usage == {"input_tokens": 50, "cached_input_tokens": 10, "output_tokens": 20}
    assert record.flags == ()
    assert record.cost_usd is not None


def test_crlf_stream_same_as_lf() -> None:
    """CRLF line ends (decoded whole, not from the ends) give the same record."""
    body = openai_chat_stream(30)
    lf = analyse(
        exchange("api.openai.com", "/v1/chat/completions", body, content_type="text/event-stream")
    )
    crlf = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            body.replace(b"\n", b"\r\n"),
            content_type="text/event-stream",
        )
    )
    assert lf == crlf


def test_request_json_not_parsed_for_model_when_response_names_it() -> None:
    """The response's dated model wins over the request's alias."""
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            CHAT_COMPLETION,
            request={"model": "gpt-4o-mini", "messages": []},
        )
    )
    assert record.model == "gpt-4o-mini-2024-07-18"


def test_fixture_is_json() -> None:
    json.dumps(CHAT_COMPLETION)
