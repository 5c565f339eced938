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

from parsers import UsageRecord, analyse

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


#: 2025-11-03T12:00Z.
NOV_2025 = 1762171200.0


def _priced(
    host: str,
    path: str,
    body: Mapping[str, object],
    *,
    query: str = "",
    request: Mapping[str, object] | None = None,
) -> UsageRecord:
    return analyse(exchange(host, path, body, query=query, request=request, started_at=NOV_2025))


def test_azure_openai_as_openai() -> None:
    """Azure OpenAI: OpenAI's usage shape (cached_tokens inside prompt_tokens),
    priced with genai-prices's azure list."""
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "total_tokens": 1100,
        "prompt_tokens_details": {"cached_tokens": 200},
    }
    record = _priced(
        "myres.openai.azure.com",
        "/openai/deployments/mini/chat/completions",
        _chat(usage, "gpt-4o-mini-2024-07-18"),
        query="api-version=2024-10-21",
    )
    assert record.usage == {"input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100}
    # gpt-4o-mini on Azure: $0.15/M input, $0.075/M cached, $0.60/M output
    # 800 x 0.15 + 200 x 0.075 + 100 x 0.6 = 120 + 15 + 60 = 195 per M
    assert record.cost_usd == pytest.approx(195e-6, rel=1e-9)


def test_anthropic_cache_reads_and_writes_beside_input() -> None:
    """Anthropic: input_tokens excludes cache_creation_input_tokens and
    cache_read_input_tokens (the Messages API reference); normalised to the
    whole prompt, writes and reads priced at their own rates."""
    body = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 50,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 2000,
            "output_tokens": 100,
        },
    }
    record = _priced("api.anthropic.com", "/v1/messages", body)
    assert record.usage == {
        "input_tokens": 3050,
        "cached_input_tokens": 2000,
        "cache_write_tokens": 1000,
        "output_tokens": 100,
    }
    # claude-3-5-haiku: $0.80/M input, $1/M cache write, $0.08/M cache read, $4/M output
    # 50 x 0.8 + 1000 x 1 + 2000 x 0.08 + 100 x 4 = 40 + 1000 + 160 + 400 = 1600 per M
    assert record.cost_usd == pytest.approx(1600e-6, rel=1e-9)


def test_gemini_thoughts_beside_candidates() -> None:
    """Gemini: promptTokenCount includes cachedContentTokenCount;
    thoughtsTokenCount is beside candidatesTokenCount, both billed as output."""
    body = {
        "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
        "usageMetadata": {
            "promptTokenCount": 1000,
            "cachedContentTokenCount": 400,
            "candidatesTokenCount": 100,
            "thoughtsTokenCount": 50,
            "totalTokenCount": 1150,
        },
        "modelVersion": "gemini-2.5-flash",
    }
    record = _priced(
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        body,
    )
    assert record.usage == {
        "input_tokens": 1000,
        "cached_input_tokens": 400,
        "output_tokens": 150,
        "reasoning_tokens": 50,
    }
    # gemini-2.5-flash: $0.30/M input, $0.03/M cached, $2.50/M output
    # 600 x 0.3 + 400 x 0.03 + 150 x 2.5 = 180 + 12 + 375 = 567 per M
    assert record.cost_usd == pytest.approx(567e-6, rel=1e-9)


def test_vertex_gemini_as_gemini() -> None:
    """Vertex AI serves Gemini with the same usageMetadata, model in the path."""
    body = {
        "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 200},
    }
    record = _priced(
        "us-central1-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
        body,
    )
    assert record.model == "gemini-2.0-flash"
    # gemini-2.0-flash: $0.10/M input, $0.40/M output: 100 + 80 = 180 per M
    assert record.cost_usd == pytest.approx(180e-6, rel=1e-9)


def test_bedrock_converse_cache_reads_beside_input() -> None:
    """Bedrock Converse: inputTokens excludes cacheReadInputTokens and
    cacheWriteInputTokens (the Converse API reference); normalised."""
    body = {
        "output": {"message": {"role": "assistant", "content": [{"text": "ok"}]}},
        "stopReason": "end_turn",
        "usage": {
            "inputTokens": 100,
            "outputTokens": 50,
            "totalTokens": 1150,
            "cacheReadInputTokens": 1000,
            "cacheWriteInputTokens": 0,
        },
        "metrics": {"latencyMs": 300},
    }
    record = _priced(
        "bedrock-runtime.us-east-1.amazonaws.com",
        "/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse",
        body,
    )
    assert record.usage == {"input_tokens": 1100, "cached_input_tokens": 1000, "output_tokens": 50}
    # Claude 3.5 Haiku on Bedrock: $0.80/M input, $0.08/M cache read, $4/M output
    # 100 x 0.8 + 1000 x 0.08 + 50 x 4 = 80 + 80 + 200 = 360 per M
    assert record.cost_usd == pytest.approx(360e-6, rel=1e-9)


def test_cohere_billed_units_win() -> None:
    """Cohere v2 chat: usage.billed_units (what is billed) over usage.tokens."""
    body = {
        "id": "c1",
        "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        "usage": {
            "billed_units": {"input_tokens": 100, "output_tokens": 50},
            "tokens": {"input_tokens": 170, "output_tokens": 52},
        },
    }
    record = _priced("api.cohere.com", "/v2/chat", body, request={"model": "command-r-08-2024"})
    assert record.usage == {"input_tokens": 100, "output_tokens": 50}
    # command-r: $0.15/M input, $0.60/M output: 15 + 30 = 45 per M
    assert record.cost_usd == pytest.approx(45e-6, rel=1e-9)


def test_groq_cached_and_reasoning_like_openai() -> None:
    """Groq: OpenAI's shape plus timings (queue_time, prompt_time, ...);
    prompt_tokens_details.cached_tokens inside prompt_tokens (groq-typescript's
    CompletionUsage), reasoning_tokens inside completion_tokens."""
    usage = {
        "queue_time": 0.02,
        "prompt_tokens": 1000,
        "prompt_time": 0.01,
        "completion_tokens": 200,
        "completion_time": 0.1,
        "total_tokens": 1200,
        "total_time": 0.11,
        "prompt_tokens_details": {"cached_tokens": 500},
        "completion_tokens_details": {"reasoning_tokens": 100},
    }
    record = _priced(
        "api.groq.com", "/openai/v1/chat/completions", _chat(usage, "openai/gpt-oss-120b")
    )
    assert record.usage == {
        "input_tokens": 1000,
        "cached_input_tokens": 500,
        "output_tokens": 200,
        "reasoning_tokens": 100,
    }
    # gpt-oss-120b on Groq: $0.15/M input, $0.075/M cached, $0.60/M output
    # 500 x 0.15 + 500 x 0.075 + 200 x 0.6 = 75 + 37.5 + 120 = 232.5 per M
    assert record.cost_usd == pytest.approx(232.5e-6, rel=1e-9)


def test_together_plain_usage() -> None:
    """Together: prompt/completion/total tokens."""
    usage = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    record = _priced(
        "api.together.xyz",
        "/v1/chat/completions",
        _chat(usage, "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    )
    # Llama 3.3 70B Turbo: $0.88/M in and out: 150 x 0.88 = 132 per M
    assert record.cost_usd == pytest.approx(132e-6, rel=1e-9)


def test_fireworks_account_model_path() -> None:
    """Fireworks: OpenAI's shape, models named accounts/fireworks/models/<id>."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    record = _priced(
        "api.fireworks.ai",
        "/inference/v1/chat/completions",
        _chat(usage, "accounts/fireworks/models/llama-v3p1-8b-instruct"),
    )
    # llama-v3p1-8b-instruct: $0.20/M in and out: 1500 x 0.2 = 300 per M
    assert record.cost_usd == pytest.approx(300e-6, rel=1e-9)


def test_openrouter_reported_cost() -> None:
    """OpenRouter: usage.cost is the USD charged (its usage accounting
    docs): the event's cost, price_ref reported:openrouter."""
    usage = {
        "prompt_tokens": 194,
        "completion_tokens": 2,
        "total_tokens": 196,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cost": 0.0000306,
        "cost_details": {"upstream_inference_cost": None},
    }
    record = _priced(
        "openrouter.ai", "/api/v1/chat/completions", _chat(usage, "openai/gpt-4o-mini")
    )
    assert record.cost_usd == pytest.approx(0.0000306, rel=1e-12)
    assert record.price_ref == "reported:openrouter"


def test_perplexity_reported_total_cost() -> None:
    """Perplexity: usage.cost.total_cost (tokens plus the per-request search
    fee) is what was charged: the event's cost."""
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 100,
        "total_tokens": 110,
        "search_context_size": "low",
        "cost": {
            "input_tokens_cost": 0.00001,
            "output_tokens_cost": 0.0001,
            "request_cost": 0.005,
            "total_cost": 0.00511,
        },
    }
    record = _priced("api.perplexity.ai", "/chat/completions", _chat(usage, "sonar"))
    assert record.cost_usd == pytest.approx(0.00511, rel=1e-12)
    assert record.price_ref == "reported:perplexity"


def test_ai21_from_our_table() -> None:
    """AI21: OpenAI's shape; Jamba priced from our table (ai21.com/pricing)."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    record = _priced("api.ai21.com", "/studio/v1/chat/completions", _chat(usage, "jamba-mini-1.7"))
    # Jamba Mini: $0.20/M input, $0.40/M output: 200 + 200 = 400 per M
    assert record.cost_usd == pytest.approx(400e-6, rel=1e-9)
    assert record.price_ref == "llmobserve:ai21/jamba-mini*"


def test_cerebras_like_openai() -> None:
    """Cerebras: OpenAI's shape plus time_info."""
    body = {
        **_chat(
            {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
            "gpt-oss-120b",
        ),
        "time_info": {"queue_time": 0.0001, "prompt_time": 0.002, "completion_time": 0.1},
    }
    record = _priced("api.cerebras.ai", "/v1/chat/completions", body)
    # gpt-oss-120b on Cerebras: $0.35/M input, $0.75/M output: 350 + 150 = 500 per M
    assert record.cost_usd == pytest.approx(500e-6, rel=1e-9)


def test_moonshot_top_level_cached_tokens() -> None:
    """Moonshot (Kimi) reports cache hits as a top-level usage.cached_tokens
    (part of prompt_tokens; the K2 models add prompt_tokens_details too):
    read as cached input, billed at the cache-hit rate."""
    usage = {
        "prompt_tokens": 1113,
        "completion_tokens": 100,
        "total_tokens": 1213,
        "cached_tokens": 1024,
    }
    record = _priced(
        "api.moonshot.ai", "/v1/chat/completions", _chat(usage, "kimi-k2-0905-preview")
    )
    assert record.usage == {"input_tokens": 1113, "cached_input_tokens": 1024, "output_tokens": 100}
    # kimi-k2-0905-preview: $0.60/M input (miss), $0.15/M cache hit, $2.50/M output
    # 89 x 0.6 + 1024 x 0.15 + 100 x 2.5 = 53.4 + 153.6 + 250 = 457 per M
    assert record.cost_usd == pytest.approx(457e-6, rel=1e-9)


def test_voyage_embeddings_total_tokens() -> None:
    """Voyage: embeddings report usage.total_tokens only."""
    body = {"object": "list", "data": [], "model": "voyage-3", "usage": {"total_tokens": 1000}}
    record = _priced("api.voyageai.com", "/v1/embeddings", body)
    assert record.usage == {"input_tokens": 1000}
    # voyage-3: $0.06/M: 60 per M
    assert record.cost_usd == pytest.approx(60e-6, rel=1e-9)


@pytest.mark.parametrize(
    ("host", "path", "body", "reason"),
    [
        (
            "integrate.api.nvidia.com",
            "/v1/chat/completions",
            _chat({"prompt_tokens": 100, "completion_tokens": 50}, "meta/llama-3.1-8b-instruct"),
            "unknown model: meta/llama-3.1-8b-instruct",
        ),
        (
            "router.huggingface.co",
            "/v1/chat/completions",
            _chat(
                {"prompt_tokens": 100, "completion_tokens": 50}, "meta-llama/Llama-3.1-8B-Instruct"
            ),
            "unknown model: meta-llama/Llama-3.1-8B-Instruct",
        ),
        (
            "api.replicate.com",
            "/v1/predictions",
            {"id": "p", "status": "succeeded", "metrics": {"predict_time": 2.5}},
            "not priced: Replicate bills hardware time, which depends on the model's hardware",
        ),
    ],
)
def test_providers_without_a_price_list(
    host: str, path: str, body: Mapping[str, object], reason: str
) -> None:
    """NVIDIA, Hugging Face's router and Replicate publish no price list that
    genai-prices or our table carries (Hugging Face bills the routed provider's
    rate, Replicate the hardware's seconds): unpriced, with the reason."""
    record = _priced(host, path, body)
    assert record.cost_usd is None
    assert record.price_ref == reason


def test_anthropic_one_hour_cache_writes_at_their_own_rate() -> None:
    """Anthropic: usage.cache_creation splits the writes by lifetime; 1-hour
    writes cost 2x the input rate, 5-minute ones 1.25x (the prompt caching
    guide). Kept as cache_write_1h_tokens, a subset of cache_write_tokens."""
    body = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 100,
            "cache_creation_input_tokens": 2000,
            "cache_read_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1000,
                "ephemeral_1h_input_tokens": 1000,
            },
            "output_tokens": 100,
        },
    }
    record = _priced("api.anthropic.com", "/v1/messages", body)
    assert record.usage == {
        "input_tokens": 2100,
        "cache_write_tokens": 2000,
        "cache_write_1h_tokens": 1000,
        "output_tokens": 100,
    }
    # claude-sonnet-4-5: $3/M input, $3.75/M 5-minute write, $6/M 1-hour write, $15/M output
    # 100 x 3 + 1000 x 3.75 + 1000 x 6 + 100 x 15 = 300 + 3750 + 6000 + 1500 = 11550 per M
    assert record.cost_usd == pytest.approx(11550e-6, rel=1e-9)
