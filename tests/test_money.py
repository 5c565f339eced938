"""Money as a person reads it (llmobserve.money)."""

from __future__ import annotations

import pytest

from llmobserve.money import usd_fixed


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (7.2e-06, "0.0000072"),
        (0.000108, "0.000108"),
        (2.5e-07, "0.00000025"),
        (3.0, "3"),
        (0, "0"),
        (-0.0, "0"),
        (12.5, "12.5"),
        (1e-12, "0.000000000001"),
    ],
)
def test_fixed_notation_with_the_shortest_digits(value: float, text: str) -> None:
    """No exponent, no rounding, no trailing zeros."""
    assert usd_fixed(value) == text


def test_the_per_call_log_line_prints_cost_in_fixed_notation() -> None:
    """Issue 14 item 14: the log said cost=7.2e-06."""
    from llmobserve.events.pipeline import _summary

    line = _summary(
        {
            "method": "POST",
            "host": "api.openai.com",
            "path": "/v1/chat/completions",
            "status": 200,
            "outcome": "ok",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "usage": {"input_tokens": 12, "output_tokens": 9},
            "cost_usd": 7.2e-06,
            "duration_ms": 3.5,
        }
    )
    assert "cost=0.0000072 " in line


def test_the_log_line_of_a_call_not_forwarded_says_why() -> None:
    """A refused call logged 'refused unknown None in=None out=None cost=None':
    it says its reason and that it was not forwarded; an unpriced call says so."""
    from llmobserve.events.pipeline import _summary

    refused = {
        "method": "POST",
        "host": "127.0.0.1",
        "path": "/v1/chat/completions",
        "status": 403,
        "outcome": "refused",
        "provider": "unknown",
        "model": None,
        "usage": {},
        "cost_usd": None,
        "duration_ms": 0.251,
        "flags": ["error:not_allowed"],
    }
    assert _summary(refused) == (
        "POST 127.0.0.1/v1/chat/completions -> 403 refused (not_allowed), not forwarded ms=0.251"
    )
    unpriced = {**refused, "status": 200, "outcome": "ok", "provider": "openai", "flags": []}
    assert "cost=unpriced " in _summary(unpriced)


def test_the_log_line_of_a_budget_refusal_says_why() -> None:
    """A budget's 402 logged 'budget_refused openai gpt-4o-mini in=None out=None
    cost=unpriced': it was never forwarded, so it says so and why."""
    from llmobserve.events.pipeline import _summary

    refused = {
        "method": "POST",
        "host": "127.0.0.1",
        "path": "/v1/chat/completions",
        "status": 402,
        "outcome": "budget_refused",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": {},
        "cost_usd": None,
        "duration_ms": 0.652,
        "flags": ["error:budget_exceeded"],
    }
    assert _summary(refused) == (
        "POST 127.0.0.1/v1/chat/completions -> 402 budget_refused (budget_exceeded),"
        " not forwarded ms=0.652"
    )
