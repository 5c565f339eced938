"""The dashboard's rollup: hourly and daily sums kept exact by rowid."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmobserve.collector import _insights
from llmobserve.collector._rollup import Rollup
from llmobserve.collector._store import EventStore

T0 = 1_750_003_200.0  # on the hour


def _calls(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {
            "id": f"e{i}",
            "kind": "call",
            "ts": T0 + i * 1800,
            "provider": "openai" if i % 2 else "anthropic",
            "cost_usd": 0.5,
            "context": {"customer_id": f"c{i % 3}"},
        }
        for i in range(start, start + n)
    ]


def test_refresh_in_steps_reports_when_it_has_caught_up(tmp_path: Path) -> None:
    """refresh(limit) adds at most limit rows; caught_up turns true with the last."""
    store = EventStore(tmp_path / "s.db")
    store.insert(_calls(50))
    rollup = Rollup()
    steps = 0
    while True:
        rollup.refresh(store, 20)
        steps += 1
        if rollup.caught_up:
            break
    assert steps == 3
    (total,) = rollup.sums("", -(2**64), 2**64).values()
    assert total.calls == 50 and total.cost == pytest.approx(25.0)
    assert {k: v.calls for k, v in rollup.sums("customer", -(2**64), 2**64).items()} == {
        "c0": 17,
        "c1": 17,
        "c2": 16,
    }
    store.insert(_calls(1, start=50))
    rollup.refresh(store)
    assert rollup.sums("", -(2**64), 2**64)[None].calls == 51
    store.close()


def test_until_warmed_up_long_windows_read_the_events(tmp_path: Path) -> None:
    """While the warm-up is behind by more than a step, a long window is summed
    from the events (the same answer); warm_up steps until it has caught up."""
    store = EventStore(tmp_path / "s.db")
    store.insert(_calls(250))  # five days and a bit: three whole days or more
    since, until = T0, T0 + 250 * 1800
    expected = store.report(["customer"], since=since, until=until)
    original = _insights.REFRESH_STEP
    try:
        _insights.REFRESH_STEP = 100  # type: ignore[misc]  # a smaller step for the test
        assert _insights._plan(store, "customer", since, until, {}) is None
        assert _insights.report(store, ["customer"], since, until, {}) == expected
        while not _insights.warm_up(store):
            pass
        assert _insights._plan(store, "customer", since, until, {}) is not None
        got = _insights.report(store, ["customer"], since, until, {})
        assert [r["customer"] for r in got] == [r["customer"] for r in expected]
        assert [r["calls"] for r in got] == [r["calls"] for r in expected]
    finally:
        _insights.REFRESH_STEP = original  # type: ignore[misc]  # a Final constant, put back after the test
        store.close()


def test_a_dimension_with_too_many_values_a_day_is_read_from_the_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_VALUES_PER_DAY values of one dimension in a day, the rollup drops
    that dimension (bounded memory) and its questions read the events."""
    monkeypatch.setattr("llmobserve.collector._rollup.MAX_VALUES_PER_DAY", 2)
    store = EventStore(tmp_path / "s.db")
    store.insert(_calls(6))
    rollup = Rollup()
    rollup.refresh(store)
    assert not rollup.covers("customer") and rollup.covers("provider")
    store.close()
