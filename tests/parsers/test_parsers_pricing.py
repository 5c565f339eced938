"""Prices: the cached plan path equals genai-prices exactly; our table; user overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st
from parsers_testkit import CHAT_COMPLETION, exchange

from parsers import analyse
from parsers.pricing import PRICER, PriceTableError
from parsers.pricing._genai import GenaiResolver

MODELS = [
    ("openai", "gpt-4o-mini-2024-07-18"),
    ("openai", "gpt-4o-2024-08-06"),
    ("openai", "o1-2024-12-17"),
    ("openai", "gpt-4o-audio-preview"),
    ("openai", "whisper-1"),
    ("anthropic", "claude-3-5-sonnet-20241022"),
    ("anthropic", "claude-3-5-haiku-20241022"),
    ("google", "gemini-1.5-pro"),  # tiered above 128k input tokens
    ("google", "gemini-2.5-flash"),
    ("deepseek", "deepseek-chat"),  # off-peak (time-of-day) prices
    ("aws", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
    ("groq", "whisper-large-v3"),
    ("mistral", "mistral-large-latest"),
]

_TO_GENAI = {
    "input_tokens": "input_tokens",
    "cached_input_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "output_tokens": "output_tokens",
    "audio_input_tokens": "input_audio_tokens",
    "audio_seconds": "audio_seconds",
}


@st.composite
def usages(draw: st.DrawFn) -> dict[str, int | float]:
    total = draw(st.integers(0, 400_000))
    usage: dict[str, int | float] = {
        "input_tokens": total,
        "output_tokens": draw(st.integers(0, 50_000)),
    }
    cached = draw(st.integers(0, total))
    if draw(st.booleans()):
        usage["cached_input_tokens"] = cached
    if draw(st.booleans()):
        usage["cache_write_tokens"] = draw(st.integers(0, total - cached))
    if draw(st.booleans()):
        usage["audio_seconds"] = draw(
            st.floats(0, 10_000, allow_nan=False).map(lambda x: round(x, 3))
        )
    if draw(st.booleans()):
        usage["audio_input_tokens"] = draw(st.integers(0, 10))
    return usage


@settings(max_examples=150, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    usage=usages(),
    when=st.floats(1.70e9, 1.80e9),
)
def test_cached_plan_equals_calc_price(
    model: tuple[str, str], usage: dict[str, int | float], when: float
) -> None:
    """The cached (provider, model, date) plan gives exactly genai-prices's Decimal answer,
    and refuses exactly the usages genai-prices refuses."""
    provider, ref = model
    resolver = GenaiResolver()
    found = resolver.plan(provider, ref, when, None)
    assert found is not None
    genai_usage = {_TO_GENAI[k]: v for k, v in usage.items()}
    stamp = datetime.fromtimestamp(when, UTC)
    try:
        expected = calc_price(
            Usage(**genai_usage), ref, provider_id=provider, genai_request_timestamp=stamp
        )
    except ValueError:
        with pytest.raises(ValueError):
            found.plan.totals(genai_usage)
        return
    total, input_, output = found.plan.totals(genai_usage)
    assert total == expected.total_price
    assert input_ == expected.input_price
    assert output == expected.output_price
    # and a second, cached, lookup is the same object, dated for price_ref
    assert resolver.plan(provider, ref, when, None) is found
    assert found.day == stamp.strftime("%Y-%m-%d")


def test_price_at_request_date() -> None:
    """Prices are taken at the request's own date (a model whose price changed)."""
    early = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            {**CHAT_COMPLETION, "model": "gpt-4o"},
            started_at=1716000000.0,
        )
    )
    late = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            {**CHAT_COMPLETION, "model": "gpt-4o"},
            started_at=1735000000.0,
        )
    )
    for record, when in ((early, 1716000000.0), (late, 1735000000.0)):
        stamp = datetime.fromtimestamp(when, UTC)
        expected = calc_price(
            Usage(input_tokens=1200, cache_read_tokens=1024, output_tokens=300),
            "gpt-4o",
            provider_id="openai",
            genai_request_timestamp=stamp,
        )
        assert record.cost_usd == float(expected.total_price)
    assert early.price_ref is not None and early.price_ref.endswith("@2024-05-18")


def test_dated_snapshot_names_resolve() -> None:
    """Dated snapshot names resolve to their model's prices."""
    for name, model_id in (
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ):
        found = GenaiResolver().plan(None, name, 1725148800.0, None)
        assert found is not None and found.model_id == model_id


def test_user_prices_override_and_add(tmp_path: Path) -> None:
    """A user file adds a model and overrides a known one, without a release."""
    path = tmp_path / "prices.json"
    path.write_text("""{"prices": [
      {"provider": "openai", "model": "my-finetune-xyz",
       "prices": {"input_mtok": 1, "output_mtok": 2}},
      {"provider": "openai", "model": "gpt-4o-mini*",
       "prices": {"input_mtok": 10, "output_mtok": 20}}
    ]}""")
    PRICER.load_user_prices(str(path))
    try:
        custom = analyse(
            exchange(
                "api.openai.com",
                "/v1/chat/completions",
                {**CHAT_COMPLETION, "model": "my-finetune-xyz"},
            )
        )
        assert custom.cost_usd == pytest.approx((1200 * 1 + 300 * 2) / 1e6)
        assert custom.price_ref == "user:openai/my-finetune-xyz"
        override = analyse(exchange("api.openai.com", "/v1/chat/completions", CHAT_COMPLETION))
        # no cache_read price in the override: cached tokens are input tokens at $10/M
        assert override.cost_usd == pytest.approx((1200 * 10 + 300 * 20) / 1e6)
    finally:
        PRICER.clear_user_prices()
    back = analyse(exchange("api.openai.com", "/v1/chat/completions", CHAT_COMPLETION))
    assert back.price_ref is not None and back.price_ref.startswith("genai-prices:")


def test_user_prices_toml_and_dates(tmp_path: Path) -> None:
    """TOML works too; start_date picks the price in force at the request's date."""
    path = tmp_path / "prices.toml"
    path.write_text("""
[[prices]]
provider = "pinecone"
model = "*"
prices = { read_munits = 20, write_munits = 5 }
start_date = "2030-01-01"

[[prices]]
provider = "pinecone"
model = "*"
prices = { read_munits = 8, write_munits = 2 }
""")
    PRICER.load_user_prices(str(path))
    try:
        host = "i-abc.svc.aped-1.pinecone.io"
        body = {"matches": [], "usage": {"readUnits": 1_000_000}}
        now = analyse(exchange(host, "/query", body))
        later = analyse(exchange(host, "/query", body, started_at=1900000000.0))
        assert now.cost_usd == pytest.approx(8.0)
        assert later.cost_usd == pytest.approx(20.0)
    finally:
        PRICER.clear_user_prices()


@pytest.mark.parametrize(
    "text",
    [
        '{"prices": [{"provider": "x", "model": "y", "prices": {"bogus_key": 1}}]}',
        '{"prices": [{"provider": "x", "model": "y", "prices": {"input_mtok": -1}}]}',
        '{"prices": [{"provider": "x", "model": "y"}]}',
        '{"prices": [{"model": "y", "prices": {"input_mtok": 1}}]}',
        '{"prices": 3}',
        "not json",
    ],
)
def test_bad_user_files_are_refused(tmp_path: Path, text: str) -> None:
    """A malformed price file raises PriceTableError naming the problem; nothing is loaded."""
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PriceTableError):
        PRICER.load_user_prices(str(path))


def test_env_variable_is_read_at_import(tmp_path: Path) -> None:
    """LLMOBSERVE_PRICES names a user file read once at import."""
    path = tmp_path / "p.json"
    path.write_text(
        '{"prices": [{"provider": "openai", "model": "zz-model", '
        '"prices": {"input_mtok": 1000000}}]}'
    )
    code = (
        "from parsers.pricing import PRICER;"
        "r = PRICER.price('openai', 'openai', 'zz-model', {'input_tokens': 1}, 1.7e9);"
        "print(r.cost_usd, r.price_ref)"
    )
    env = {**os.environ, "LLMOBSERVE_PRICES": str(path)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.split() == ["1.0", "user:openai/zz-model"]


def test_invalid_usage_gives_null_not_garbage() -> None:
    """Cached tokens above input tokens (an API bug) : null cost and a reason."""
    body = {
        **CHAT_COMPLETION,
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 50},
        },
    }
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", body))
    assert record.cost_usd is None
    assert record.price_ref is not None and "invalid usage" in record.price_ref


def test_builtin_prices_each_have_a_source_and_date() -> None:
    """Issue 16: every entry of llmobserve's own table names the provider's
    pricing page (an https URL) and the date its figures are from (as_of)."""
    text = (Path(__file__).parents[2] / "parsers" / "data" / "prices.json").read_text("utf-8")
    for entry in json.loads(text)["prices"]:
        name = f"{entry['provider']}/{entry['model']}"
        assert str(entry.get("source", "")).startswith("https://"), name
        assert datetime.strptime(entry["as_of"], "%Y-%m-%d"), name


def test_as_of_must_be_a_date(tmp_path: Path) -> None:
    """A price file's as_of, when given, is a YYYY-MM-DD date."""
    path = tmp_path / "p.json"
    path.write_text(
        '{"prices": [{"provider": "x", "model": "*", "prices": {"per_request": 1},'
        ' "as_of": "last spring"}]}'
    )
    with pytest.raises(PriceTableError, match="as_of must be YYYY-MM-DD"):
        PRICER.load_user_prices(str(path))
