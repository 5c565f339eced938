"""PostgreSQL's summary tables (_pgsummary): /api/summary read from them is
/api/summary read from the events (its percentiles within the histogram's
2.5 %, and the same as SQLite's), for any events, duplicates, two writers
and retention; /api/timeseries in whole days reads the daily table."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmobserve.collector import _insights
from llmobserve.collector._pgstore import PgEventStore
from llmobserve.collector._store import EventStore

T0 = 1_750_003_200.0  # on the hour (and at 16:00 UTC)
HOUR = 3600.0
#: A percentile read from the histogram is its bucket's geometric middle:
#: at most half a bucket (1 / 40 in ln) from the exact value.
BOUND = 0.5 / 20 + 1e-9


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[PgEventStore, PgEventStore]]:
    """Two stores on one database: two collectors' writers."""
    first, second = PgEventStore(pg_url), PgEventStore(pg_url)
    yield first, second
    first.close()
    second.close()


def _from_events(store: PgEventStore, since: float | None, until: float | None) -> dict[str, Any]:
    """The summary as the events alone give it (no tables)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "summary_rollup", lambda *args: None)
        return _insights.summary(store, since, until, {})


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal but for the percentiles, which are within the histogram's bound."""
    got, want = dict(got), dict(want)
    got_latency, want_latency = got.pop("latency_ms"), want.pop("latency_ms")
    assert got == want
    for q in ("p50", "p95"):
        g, w = got_latency[q], want_latency[q]
        assert (g is None) == (w is None), (q, g, w)
        if g is not None:
            # (the middle is given to the microsecond: 0.0005 ms more either way)
            assert w * math.exp(-BOUND) - 0.0005 <= g <= w * math.exp(BOUND) + 0.0005, (q, g, w)


_TS = st.one_of(
    st.integers(0, 72).map(lambda h: T0 + h * HOUR),
    st.integers(1, 72).map(lambda h: T0 + h * HOUR - 1e-6),
    st.floats(T0 - HOUR, T0 + 72 * HOUR),
    st.sampled_from([None, 1e300, -62_135_596_800.0]),
)
_EVENT = st.fixed_dictionaries(
    {
        "id": st.integers(0, 40).map(lambda i: f"e{i}"),
        "kind": st.sampled_from(["call", "call", "call", "span"]),
        "ts": _TS,
        # positive or none: the histogram leaves out what has no logarithm
        "duration_ms": st.one_of(st.none(), st.floats(0.01, 1e6)),
        "status": st.sampled_from([None, 200, 429, 500]),
        "provider": st.sampled_from([None, "openai", "anthropic"]),
        "outcome": st.sampled_from([None, "ok", "refused", "upstream_error", "budget_refused"]),
        "cost_usd": st.one_of(st.none(), st.none(), st.floats(0, 10), st.just(1e300)),
        "price_ref": st.sampled_from([None, "unknown model: a", "unknown model: b", "b", ""]),
        "usage_source": st.sampled_from([None, "reported", "estimated"]),
        "usage": st.fixed_dictionaries(
            {},
            optional={
                "input_tokens": st.integers(0, 2**40),
                "output_tokens": st.integers(0, 10_000),
            },
        ),
    }
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=st.lists(_EVENT, max_size=40),
    resent=st.lists(st.integers(0, 39), max_size=10),
    cut=st.integers(0, 72),
    since=st.one_of(st.none(), st.floats(T0 - 2 * HOUR, T0 + 40 * HOUR)),
    span=st.floats(0, 50 * HOUR),
)
def test_a_summary_from_the_tables_is_the_summary_from_the_events(
    stores: tuple[PgEventStore, PgEventStore],
    events: list[dict[str, Any]],
    resent: list[int],
    cut: int,
    since: float | None,
    span: float,
) -> None:
    """Random events written by two writers in turns, some delivered twice:
    the summary of every window of three whole hours or more, read from the
    tables (whole days and hours plus the window's edges), is the summary
    summed from the events (calls, cost, tokens, errors, refused, unpriced
    and its reasons, to the last digit), its percentiles within 2.5 %; and
    again after retention drops the events before a random time."""
    first, second = stores
    with psycopg.connect(first.url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE events, rollup_hourly, rollup_daily, rollup_latency_hourly,"
            " rollup_latency_daily, rollup_unpriced_hourly, rollup_unpriced_daily"
        )
    half = len(events) // 2
    first.insert(events[:half])
    second.insert(events[half:])
    first.insert([events[i] for i in resent if i < len(events)])  # delivered twice
    windows = [
        (None, None),
        (since, None if since is None else since + span),
        (T0 + HOUR, T0 + 30 * HOUR),  # whole hours and edges
        (T0 + 0.5, T0 + 60 * HOUR + 0.5),  # whole days, whole hours and edges
        (T0 - 8 * HOUR, None),
    ]
    for store in (first, second):
        for window in windows:
            read = store.summary_rollup(*window, 5) is not None
            whole = math.floor((window[1] or 1e18) / HOUR) - math.ceil((window[0] or -1e18) / HOUR)
            assert read == (whole >= 3), window  # the tables answer every long window
            _assert_same(_insights.summary(store, *window, {}), _from_events(store, *window))
        while second.drop_before(T0 + cut * HOUR, limit=7) == 7:
            pass


def _calls(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"c{i}",
            "kind": "call",
            "ts": T0 + i * 211.7,
            "duration_ms": 5.0 * 1.0013**i,
            "status": 500 if i % 13 == 0 else 200,
            "outcome": "refused" if i % 17 == 0 else "ok",
            "provider": ["openai", "anthropic"][i % 2],
            "model": f"m{i % 3}",
            "cost_usd": None if i % 5 == 0 else 0.001 * (i % 9),
            "price_ref": f"unknown model: m{i % 4}" if i % 5 == 0 else None,
            "usage": {"input_tokens": i, "output_tokens": 3},
        }
        for i in range(n)
    ]


def test_the_percentiles_are_sqlites(
    stores: tuple[PgEventStore, PgEventStore], tmp_path: Path
) -> None:
    """The same calls in a SQLite store and in PostgreSQL: a long window's
    summary is the same on both, latency percentiles included (both read
    the same histogram buckets; PostgreSQL read the exact values before)."""
    store = stores[0]
    events = _calls(2000)
    store.insert(events)
    sqlite = EventStore(tmp_path / "events.db")
    try:
        sqlite.insert(events)
        for since, until in [(None, None), (T0 + 100.0, T0 + 90 * HOUR + 7), (T0 + 3 * HOUR, None)]:
            assert store.summary_rollup(since, until, 5) is not None
            got = _insights.summary(store, since, until, {})
            want = _insights.summary(sqlite, since, until, {})
            assert got["latency_ms"] == want["latency_ms"]
            assert {k: v for k, v in got.items() if k != "latency_ms"} == {
                k: v for k, v in want.items() if k != "latency_ms"
            }
            _assert_same(got, _from_events(store, since, until))
    finally:
        sqlite.close()


def test_short_or_filtered_windows_read_the_events(
    stores: tuple[PgEventStore, PgEventStore],
) -> None:
    """A window of fewer than three whole hours, or a filtered one, is
    summed from the events: exact percentiles."""
    store = stores[0]
    store.insert(_calls(300))
    assert store.summary_rollup(T0 + 10, T0 + 3 * HOUR + 10, 5) is None  # two whole hours
    got = _insights.summary(store, None, None, {"provider": "openai"})
    ((p50,),) = store.read(
        "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY duration_ms) FROM events"
        " WHERE provider = 'openai'"
    )
    assert got["latency_ms"]["p50"] == p50


def test_the_migration_sums_the_events_already_stored(pg_url: str) -> None:
    """A database of schema 4 with events in it: migrating to schema 5 sums
    them into the summary's tables, so a summary read from them at once is
    right; a reader of this version on schema 4 reads the events."""
    from llmobserve.collector import _pgstore

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE llmobserve_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, migration in enumerate(_pgstore.MIGRATIONS[:4], start=1):
            conn.execute(migration)
            conn.execute("INSERT INTO llmobserve_schema (version) VALUES (%s)", (number,))
    old = PgEventStore(pg_url, migrate=False)  # as an llmobserve before the summary's tables
    old.insert(_calls(500))
    assert old.summary_rollup(None, None, 5) is None
    before = _insights.summary(old, None, None, {})
    old.close()
    store = PgEventStore(pg_url)
    try:
        ((rows,),) = store.read("SELECT count(*) FROM rollup_latency_hourly")
        assert rows > 0
        assert store.summary_rollup(None, None, 5) is not None
        after = _insights.summary(store, None, None, {})
        _assert_same(after, before)
        assert after["unpriced_reasons"] and after["errors"] > 0
    finally:
        store.close()


def test_a_series_of_whole_days_reads_the_daily_report(
    stores: tuple[PgEventStore, PgEventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/api/timeseries in buckets of whole days (the dashboard's 30-day and
    longer windows) reads the store's report per day (the daily table, 24
    times fewer rows than the hourly one): the same series as summed from
    the events."""
    store = stores[0]
    store.insert(
        [{**e, "ts": T0 + i * 1733.1} for i, e in enumerate(_calls(1500))]  # about 30 days
    )
    asked: list[tuple[str, ...]] = []
    report = store.report

    def counted(by: tuple[str, ...], **kw: Any) -> list[dict[str, Any]]:
        asked.append(by)
        return report(by, **kw)

    monkeypatch.setattr(store, "report", counted)
    cases = [("provider", 86_400, {}), ("model", 7 * 86_400, {"provider": "openai"})]
    until = T0 + 31 * 86_400 + 5
    got = [
        _insights.timeseries(store, by, bucket, T0 - 4000, until, filters)
        for by, bucket, filters in cases
    ]
    assert asked == [("day", "provider"), ("day", "model")]
    monkeypatch.setattr(store, "rollup_answers", lambda by, filters: False)
    for (by, bucket, filters), series in zip(cases, got, strict=True):
        assert series == _insights.timeseries(store, by, bucket, T0 - 4000, until, filters)
        assert sum(sum(s["calls"]) for s in series["series"]) > 0
