"""The collector's stop line gives its uptime in two units at most."""

from __future__ import annotations

import pytest

from llmobserve.collector._service import duration_text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1.0, "0 s"),
        (0.4, "0 s"),
        (59.9, "59 s"),
        (60.0, "1 min 0 s"),
        (312.0, "5 min 12 s"),
        (3600.0, "1 h 0 min"),
        (3 * 3600 + 4 * 60 + 59, "3 h 4 min"),
        (2 * 86400 + 3 * 3600 + 1, "2 d 3 h"),
    ],
)
def test_uptime_is_two_units_at_most(seconds: float, text: str) -> None:
    """Seconds alone under a minute, then minutes and seconds, hours and
    minutes, days and hours; never negative."""
    assert duration_text(seconds) == text
