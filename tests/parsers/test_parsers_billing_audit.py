"""Issue 16, "Bill like the provider": how each provider reports cached and
reasoning tokens and its own cost, one test per provider from a response
shape in its documentation, with the expected cost worked out by hand.

Where the provider's figures are quoted from a documented example the test
says so; otherwise the shape (field names and what they include) is the
documented one and the numbers are chosen to make the arithmetic visible.
Anthropic, Gemini, Bedrock, Cohere, OpenRouter, Perplexity and Groq have
theirs in test_parsers_llm_providers.py and test_parsers_openai.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from parsers_testkit import exchange

from parsers import analyse

#: 2025-06-02T10:00Z: DeepSeek's peak hours (its off-peak discount does not apply).
JUNE_2025 = 1748858400.0


def _chat(usage: Mapping[str, object], model: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-audit",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": usage,
    }


def test_openai_reasoning_is_inside_completion_tokens() -> None:
    """OpenAI: completion_tokens includes reasoning_tokens (total = prompt +
    completion); cached_tokens is part of prompt_tokens."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 2000,
        "total_tokens": 3000,
        "prompt_tokens_details": {"cached_tokens": 512, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 1500,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            _chat(usage, "o3-mini"),
            started_at=JUNE_2025,
        )
    )
    assert record.usage == {
        "input_tokens": 1000,
        "cached_input_tokens": 512,
        "output_tokens": 2000,
        "reasoning_tokens": 1500,
    }
    # o3-mini: $1.10/M input, $0.55/M cached input, $4.40/M output
    # 488 x 1.10 + 512 x 0.55 + 2000 x 4.40 = 536.8 + 281.6 + 8800 = 9618.4 per M
    assert record.cost_usd == pytest.approx(9618.4e-6, rel=1e-9)
    assert "reasoning_beside_completion" not in record.flags


def test_xai_reasoning_is_beside_completion_tokens() -> None:
    """xAI counts reasoning beside completion_tokens (total = prompt + completion
    + reasoning), and both are billed as output. Figures: the documented example
    of grok-4.1-fast-reasoning (Google Cloud, "Reasoning for Grok models"),
    where cost_in_usd_ticks is 0 (billed by Google): priced from the tokens."""
    usage = {
        "completion_tokens": 50,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0,
            "audio_tokens": 0,
            "reasoning_tokens": 124,
            "rejected_prediction_tokens": 0,
        },
        "cost_in_usd_ticks": 0,
        "num_sources_used": 0,
        "prompt_tokens": 663,
        "prompt_tokens_details": {
            "audio_tokens": 0,
            "cached_tokens": 654,
            "image_tokens": 0,
            "text_tokens": 663,
        },
        "total_tokens": 837,
    }
    record = analyse(
        exchange(
            "api.x.ai",
            "/v1/chat/completions",
            _chat(usage, "grok-4-1-fast-reasoning"),
            started_at=1775523905.0,
        )
    )
    assert record.usage == {
        "input_tokens": 663,
        "cached_input_tokens": 654,
        "output_tokens": 174,
        "reasoning_tokens": 124,
    }
    assert "reasoning_beside_completion" in record.flags
    # grok-4-1-fast-reasoning: $0.20/M input, $0.05/M cached, $0.50/M output
    # 9 x 0.20 + 654 x 0.05 + (50 + 124) x 0.50 = 1.8 + 32.7 + 87 = 121.5 per M
    assert record.cost_usd == pytest.approx(121.5e-6, rel=1e-9)


def test_xai_reported_cost_in_ticks_wins() -> None:
    """xAI's usage.cost_in_usd_ticks is the billed amount, 10^10 ticks a dollar
    (docs.x.ai, Cost Tracking: 37756000 ticks cost $0.0038)."""
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "total_tokens": 110,
        "cost_in_usd_ticks": 37756000,
    }
    record = analyse(
        exchange("api.x.ai", "/v1/chat/completions", _chat(usage, "grok-4"), started_at=JUNE_2025)
    )
    assert record.cost_usd == pytest.approx(0.0037756, rel=1e-12)
    assert record.price_ref == "reported:xai"


def test_deepseek_cache_hits_under_their_own_names() -> None:
    """DeepSeek: prompt_cache_hit_tokens / prompt_cache_miss_tokens (their sum
    is prompt_tokens); reasoning_tokens inside completion_tokens."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "total_tokens": 1500,
        "prompt_cache_hit_tokens": 600,
        "prompt_cache_miss_tokens": 400,
        "completion_tokens_details": {"reasoning_tokens": 300},
    }
    record = analyse(
        exchange(
            "api.deepseek.com",
            "/chat/completions",
            _chat(usage, "deepseek-reasoner"),
            started_at=JUNE_2025,
        )
    )
    assert record.usage == {
        "input_tokens": 1000,
        "cached_input_tokens": 600,
        "output_tokens": 500,
        "reasoning_tokens": 300,
    }
    # deepseek-reasoner, peak hours: $0.55/M miss, $0.14/M hit, $2.19/M output
    # 400 x 0.55 + 600 x 0.14 + 500 x 2.19 = 220 + 84 + 1095 = 1399 per M
    assert record.cost_usd == pytest.approx(1399e-6, rel=1e-9)


def test_mistral_plain_usage() -> None:
    """Mistral: prompt/completion/total only (no cache or reasoning fields)."""
    usage = {"prompt_tokens": 16, "completion_tokens": 34, "total_tokens": 50}
    record = analyse(
        exchange(
            "api.mistral.ai",
            "/v1/chat/completions",
            _chat(usage, "mistral-small-latest"),
            started_at=JUNE_2025,
        )
    )
    assert record.usage == {"input_tokens": 16, "output_tokens": 34}
    # mistral-small-latest: $0.10/M input, $0.30/M output: 1.6 + 10.2 = 11.8 per M
    assert record.cost_usd == pytest.approx(11.8e-6, rel=1e-9)
