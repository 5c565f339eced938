"""The log limiter: a few lines of each kind per window, then one count."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher

from llmobserve._loglimit import LogLimiter


def _summaries(seen: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["kind"], e["n"]) for e in seen if "more like this" in e.get("log_format", "")]


def test_burst_then_count_per_kind_and_window() -> None:
    """Each kind gets C{burst} lines a window; the rest are counted and told
    in one line when the window ends, even if no further line comes."""
    clock = Clock()
    limiter = LogLimiter(clock, burst=2, window=60.0)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, seen.append))
    try:
        assert [limiter.allow("a") for _ in range(5)] == [True, True, False, False, False]
        assert limiter.allow("b")  # another kind has its own allowance
        clock.advance(59)
        assert _summaries(seen) == []
        clock.advance(1)
        assert _summaries(seen) == [("a", 3)]
        assert limiter.allow("a")  # a new window
        assert limiter.suppressed == 3
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, seen.append))


def test_stop_tells_what_is_held_back() -> None:
    """On stop, the counts not yet told are logged and no timer is left."""
    clock = Clock()
    limiter = LogLimiter(clock, burst=1, window=60.0)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, seen.append))
    try:
        for _ in range(4):
            limiter.allow("a")
        limiter.stop()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, seen.append))
    assert _summaries(seen) == [("a", 3)]
    assert clock.getDelayedCalls() == []
