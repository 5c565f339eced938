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
