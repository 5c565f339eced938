"""Issue 16, price modifiers: what changes a bill beyond the token counts,
priced and recorded in the event's flags as C{pricing:<what>}.

Costs are worked out by hand in each test from the rates quoted there
(genai-prices's data for the tokens, the provider's pricing page for the
per-call fees).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest
from parsers_testkit import exchange

from parsers import analyse

#: 2025-11-03T12:00Z.
NOV_2025 = 1762171200.0
#: 2026-12-01T12:00Z: genai-prices has OpenAI's flex and priority prices from 2026-10-12.
DEC_2026 = 1796126400.0


def _jsonl(rows: Sequence[Mapping[str, object]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _claude(usage: Mapping[str, object], model: str = "claude-sonnet-4-5") -> dict[str, object]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }


def test_openai_flex_tier_is_priced_and_flagged() -> None:
    """A response with service_tier "flex" is priced at the flex variant and
    flagged pricing:service_tier=flex."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "o3",
        "service_tier": "flex",
        "choices": [],
        "usage": usage,
    }
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", body, started_at=DEC_2026))
    standard = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            {**body, "service_tier": "default"},
            started_at=DEC_2026,
        )
    )
    assert "pricing:service_tier=flex" in record.flags
    assert not any(f.startswith("pricing:") for f in standard.flags)
    assert "pricing:service_tier=flex,unpriced" not in record.flags
    # o3: $2/M input, $8/M output; flex halves both: 1000 x 1 + 1000 x 4 = 5000 per M
    assert standard.cost_usd == pytest.approx(10000e-6, rel=1e-9)
    assert record.cost_usd == pytest.approx(5000e-6, rel=1e-9)


def test_anthropic_long_context_tier() -> None:
    """A Claude Sonnet 4.5 prompt over 200k tokens (cache reads included) is
    priced at the long-context rates, flagged pricing:long_context."""
    long = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages",
            _claude(
                {"input_tokens": 50000, "cache_read_input_tokens": 200000, "output_tokens": 1000}
            ),
            started_at=NOV_2025,
        )
    )
    assert long.usage["input_tokens"] == 250000
    assert "pricing:long_context" in long.flags
    # over 200k: $6/M input, $0.60/M cache read, $22.50/M output
    # 50000 x 6 + 200000 x 0.6 + 1000 x 22.5 = 300000 + 120000 + 22500 = 442500 per M
    assert long.cost_usd == pytest.approx(0.4425, rel=1e-9)
    short = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages",
            _claude({"input_tokens": 200000, "output_tokens": 1000}),
            started_at=NOV_2025,
        )
    )
    assert "pricing:long_context" not in short.flags
    # exactly 200k is not over: $3/M input, $15/M output: 600000 + 15000 per M
    assert short.cost_usd == pytest.approx(0.615, rel=1e-9)


def test_gemini_long_context_tier() -> None:
    """Gemini 2.5 Pro: a prompt over 200k tokens is priced at the higher tier."""
    body = {
        "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
        "usageMetadata": {
            "promptTokenCount": 210000,
            "candidatesTokenCount": 100,
            "totalTokenCount": 210100,
        },
        "modelVersion": "gemini-2.5-pro",
    }
    record = analyse(
        exchange(
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-pro:generateContent",
            body,
            started_at=NOV_2025,
        )
    )
    assert "pricing:long_context" in record.flags
    # over 200k: $2.50/M input, $15/M output: 210000 x 2.5 + 100 x 15 = 526500 per M
    assert record.cost_usd == pytest.approx(0.5265, rel=1e-9)


def test_anthropic_web_search_fee_added() -> None:
    """Anthropic's server_tool_use.web_search_requests are billed per search on
    top of the tokens ($10 per 1,000, genai-prices's web_searches rate for the
    model): added to the cost, flagged, named in price_ref."""
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "server_tool_use": {"web_search_requests": 3},
    }
    record = analyse(
        exchange("api.anthropic.com", "/v1/messages", _claude(usage), started_at=NOV_2025)
    )
    assert "pricing:web_search=3" in record.flags
    # 1000 x 3 + 500 x 15 = 10500 per M = $0.0105, plus 3 x $0.01
    assert record.cost_usd == pytest.approx(0.0405, rel=1e-9)
    assert record.cost_breakdown is not None
    assert record.cost_breakdown["tools"] == pytest.approx(0.03)
    assert record.price_ref is not None and record.price_ref.endswith(" + 3 web_search")


def test_openai_web_search_calls_priced_per_call() -> None:
    """Responses API web_search_call items are billed per call: $10 per 1,000
    for gpt-4.1-mini in genai-prices's data, added to the tokens."""
    body = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1-mini",
        "output": [
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "message", "role": "assistant", "content": []},
        ],
        "usage": {"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100},
    }
    record = analyse(exchange("api.openai.com", "/v1/responses", body, started_at=NOV_2025))
    assert "pricing:web_search=1" in record.flags
    # gpt-4.1-mini: $0.40/M input, $1.60/M output: 400 + 160 = 560 per M, plus $0.01
    assert record.cost_usd == pytest.approx(560e-6 + 0.01, rel=1e-9)


def test_tool_calls_without_a_rate_are_flagged_unpriced() -> None:
    """A model whose price list has no per-search rate: the searches are
    counted and flagged unpriced, the tokens priced."""
    usage = {
        "input_tokens": 1000,
        "output_tokens": 0,
        "server_tool_use": {"web_search_requests": 2},
    }
    record = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages",
            _claude(usage, model="claude-3-haiku-20240307"),
            started_at=NOV_2025,
        )
    )
    assert "pricing:web_search=2,unpriced" in record.flags
    # claude-3-haiku: $0.25/M input: 1000 x 0.25 = 250 per M
    assert record.cost_usd == pytest.approx(250e-6, rel=1e-9)


def test_gemini_grounding_priced_per_grounded_prompt() -> None:
    """Grounding with Google Search: Gemini 2.5 bills it per grounded prompt
    ($35 per 1,000 in genai-prices's data; the daily free allowance is not
    visible to the proxy), whatever the number of queries it ran."""
    body = {
        "candidates": [
            {
                "content": {"parts": [{"text": "ok"}], "role": "model"},
                "groundingMetadata": {"webSearchQueries": ["a", "b"]},
            }
        ],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 10},
        "modelVersion": "gemini-2.5-flash",
    }
    record = analyse(
        exchange(
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            body,
            started_at=NOV_2025,
        )
    )
    assert "pricing:grounding=1" in record.flags
    assert record.details["grounding_queries"] == 2
    # gemini-2.5-flash: $0.30/M input, $2.50/M output: 3 + 25 = 28 per M, plus $0.035
    assert record.cost_usd == pytest.approx(28e-6 + 0.035, rel=1e-9)


def test_openai_batch_creation_recorded() -> None:
    """POST /v1/batches: recorded as a batch, billed later through its results."""
    batch = {
        "id": "batch_abc123",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-abc123",
        "completion_window": "24h",
        "status": "validating",
    }
    record = analyse(exchange("api.openai.com", "/v1/batches", batch, started_at=NOV_2025))
    assert record.endpoint == "batches"
    assert "pricing:batch" in record.flags
    assert record.cost_usd is None
    assert record.price_ref == (
        "not priced: a batch is billed when it runs: priced from its results file"
    )


def test_openai_batch_results_priced_at_half() -> None:
    """The results file of a batch (GET /v1/files/{id}/content, the shape in
    OpenAI's Batch guide) is priced: its lines' usage summed, at half price;
    a failed request (no response body) is not billed."""
    lines: list[Mapping[str, object]] = [
        {
            "id": "batch_req_1",
            "custom_id": "request-1",
            "response": {
                "status_code": 200,
                "request_id": "req_1",
                "body": {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": "gpt-4o-mini-2024-07-18",
                    "choices": [],
                    "usage": {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24},
                },
            },
            "error": None,
        },
        {
            "id": "batch_req_2",
            "custom_id": "request-2",
            "response": {
                "status_code": 200,
                "request_id": "req_2",
                "body": {
                    "id": "chatcmpl-2",
                    "object": "chat.completion",
                    "model": "gpt-4o-mini-2024-07-18",
                    "choices": [],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40},
                },
            },
            "error": None,
        },
        {
            "id": "batch_req_3",
            "custom_id": "request-3",
            "response": None,
            "error": {"code": "batch_expired", "message": "expired"},
        },
    ]
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/files/file-xyz/content",
            _jsonl(lines),
            method="GET",
            content_type="application/octet-stream",
            started_at=NOV_2025,
        )
    )
    assert record.endpoint == "batch.results"
    assert record.model == "gpt-4o-mini-2024-07-18"
    assert record.usage == {"input_tokens": 52, "output_tokens": 12}
    assert record.details["batch_requests"] == 2
    assert "pricing:batch" in record.flags
    # gpt-4o-mini: $0.15/M input, $0.60/M output: 52 x 0.15 + 12 x 0.6 = 15 per M, halved
    assert record.cost_usd == pytest.approx(7.5e-6, rel=1e-9)
    assert record.price_ref is not None and record.price_ref.endswith(" x0.5 (batch)")


def test_anthropic_batch_results_priced_at_half() -> None:
    """Anthropic Message Batches results (JSON Lines of result.message, as in
    its Batch processing guide): summed and halved; an errored line skipped."""
    lines: list[Mapping[str, object]] = [
        {
            "custom_id": "my-first-request",
            "result": {
                "type": "succeeded",
                "message": _claude(
                    {"input_tokens": 11, "output_tokens": 36, "service_tier": "batch"}
                ),
            },
        },
        {
            "custom_id": "my-second-request",
            "result": {"type": "errored", "error": {"type": "invalid_request_error"}},
        },
    ]
    record = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages/batches/msgbatch_01/results",
            _jsonl(lines),
            method="GET",
            content_type="application/binary",
            started_at=NOV_2025,
        )
    )
    assert record.usage == {"input_tokens": 11, "output_tokens": 36}
    assert "pricing:batch" in record.flags
    # claude-sonnet-4-5: 11 x 3 + 36 x 15 = 573 per M, halved: 286.5 per M
    assert record.cost_usd == pytest.approx(286.5e-6, rel=1e-9)


def test_batch_results_of_several_models_not_priced() -> None:
    """One event has one model: a results file mixing models says so, unpriced."""
    rows = [
        {
            "custom_id": f"r{i}",
            "response": {
                "status_code": 200,
                "body": {
                    "model": model,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            },
        }
        for i, model in enumerate(("gpt-4o-mini", "gpt-4o"))
    ]
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/files/file-1/content",
            _jsonl(rows),
            method="GET",
            started_at=NOV_2025,
        )
    )
    assert record.cost_usd is None
    assert record.price_ref == (
        "not priced: batch results mix models (gpt-4o-mini, gpt-4o): one event has one model"
    )


def test_openai_flex_before_its_price_is_known_says_so() -> None:
    """genai-prices has OpenAI's flex prices from 2026-10-12 only: an earlier
    flex call is priced at the standard rates and flagged so."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "o3",
        "service_tier": "flex",
        "choices": [],
        "usage": usage,
    }
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", body, started_at=NOV_2025))
    assert "pricing:service_tier=flex" in record.flags
    assert "pricing:service_tier=flex,unpriced" in record.flags
    # o3 standard: 1000 x 2 + 1000 x 8 = 10000 per M
    assert record.cost_usd == pytest.approx(10000e-6, rel=1e-9)


def test_batch_results_use_the_datas_batch_prices_when_it_has_them() -> None:
    """From 2026-10-14 genai-prices carries batch prices of its own
    (processing: batch): they are used instead of halving."""
    row = {
        "custom_id": "r1",
        "response": {
            "status_code": 200,
            "body": {
                "model": "gpt-4o-mini",
                "usage": {"prompt_tokens": 52, "completion_tokens": 12, "total_tokens": 64},
            },
        },
    }
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/files/file-1/content",
            _jsonl([row]),
            method="GET",
            started_at=DEC_2026,
        )
    )
    assert "pricing:batch" in record.flags
    assert not any(f.startswith("pricing:processing") for f in record.flags)
    assert record.price_ref is not None and record.price_ref.endswith(" (batch prices)")
    # gpt-4o-mini batch: $0.075/M input, $0.30/M output: 3.9 + 3.6 = 7.5 per M
    assert record.cost_usd == pytest.approx(7.5e-6, rel=1e-9)


def test_batch_input_file_download_is_not_billed() -> None:
    """A batch's input file (request lines with custom_id, no responses) read
    back through /v1/files/{id}/content is not a billed call."""
    row = {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
    }
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/files/file-in/content",
            _jsonl([row]),
            method="GET",
            started_at=NOV_2025,
        )
    )
    assert record.endpoint == "batch.input"
    assert "pricing:batch" not in record.flags
    assert record.price_ref == "not priced: a batch input file is not billed"


def test_batch_results_longer_than_the_copy_are_not_priced() -> None:
    """A results file cut by the proxy's copy bound is still recognised as a
    batch, but left unpriced rather than priced from the lines seen."""
    row = {
        "custom_id": "r1",
        "response": {
            "status_code": 200,
            "body": {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        },
    }
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/files/file-1/content",
            _jsonl([row]),
            method="GET",
            response_truncated=True,
            started_at=NOV_2025,
        )
    )
    assert "pricing:batch" in record.flags
    assert record.cost_usd is None
    assert record.price_ref == "not priced: batch results longer than the copy kept for parsing"


def test_openai_responses_stream_counts_web_search_calls() -> None:
    """A streamed Responses call: the web_search_call items of the
    response.completed event are priced per call too."""
    completed = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-4.1-mini",
            "output": [
                {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                {"type": "web_search_call", "id": "ws_2", "status": "completed"},
                {"type": "message", "role": "assistant", "content": []},
            ],
            "usage": {"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100},
        },
    }
    created = {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4.1-mini"}}
    stream = (
        b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
        b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    )
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/responses",
            stream,
            content_type="text/event-stream",
            started_at=NOV_2025,
        )
    )
    assert record.streamed
    assert "pricing:web_search=2" in record.flags
    # 1000 x 0.40 + 100 x 1.60 = 560 per M, plus 2 x $0.01
    assert record.cost_usd == pytest.approx(560e-6 + 0.02, rel=1e-9)


def test_claude_long_prompt_without_a_tier_in_the_data_says_so() -> None:
    """Claude Sonnet 4 (1M-context beta) bills prompts over 200k at higher
    rates that genai-prices 0.2.3 does not carry for it: priced at the base
    rates and flagged pricing:long_context,unpriced."""
    record = analyse(
        exchange(
            "api.anthropic.com",
            "/v1/messages",
            _claude({"input_tokens": 300000, "output_tokens": 0}, model="claude-sonnet-4-20250514"),
            started_at=NOV_2025,
        )
    )
    assert "pricing:long_context,unpriced" in record.flags
    # base rate: 300000 x $3/M = $0.90
    assert record.cost_usd == pytest.approx(0.9, rel=1e-9)
