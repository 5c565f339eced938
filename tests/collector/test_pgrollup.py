"""PostgreSQL's hourly rollup (_pgrollup): a report read from it is the
report read from the events, for any events, duplicates, two writers and
retention."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmobserve.collector._pgrollup import END_HOUR, FIRST_HOUR
from llmobserve.collector._pgstore import PgEventStore
from llmobserve.collector._store import Store

T0 = 1_750_003_200.0  # on the hour
HOUR = 3600.0


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[PgEventStore, PgEventStore]]:
    """Two stores on one database: two collectors' writers."""
    first, second = PgEventStore(pg_url), PgEventStore(pg_url)
    yield first, second
    first.close()
    second.close()


def _from_events(store: PgEventStore, by: tuple[str, ...], **kw: Any) -> list[dict[str, Any]]:
    """The report as the events alone give it (L{Store.report}, no rollup)."""
    return Store.report(store, by, **kw)


def _rollup_rows(store: PgEventStore) -> int:
    ((n,),) = store.read("SELECT count(*) FROM rollup_hourly")
    return int(n)


_TS = st.one_of(
    # on, just before and just after hour boundaries, and anywhere in three days
    st.integers(0, 72).map(lambda h: T0 + h * HOUR),
    st.integers(1, 72).map(lambda h: T0 + h * HOUR - 1e-6),
    st.integers(0, 72).map(lambda h: T0 + h * HOUR + 0.5),
    st.floats(T0 - HOUR, T0 + 72 * HOUR),
    st.sampled_from([None, 1e300, -1e300, -62_135_596_800.0, 253_402_300_799.5]),
)
_LABEL = st.sampled_from([None, "a", "b", "a/x", "a/x/y", "ü"])
_EVENT = st.fixed_dictionaries(
    {
        "id": st.integers(0, 40).map(lambda i: f"e{i}"),
        "kind": st.sampled_from(["call", "call", "call", "span"]),
        "ts": _TS,
        "provider": st.sampled_from([None, "openai", "anthropic"]),
        "model": st.sampled_from([None, "m1", "m2"]),
        "endpoint": st.sampled_from([None, "chat.completions"]),
        "outcome": st.sampled_from([None, "ok", "refused", "upstream_error", "budget_refused"]),
        "cost_usd": st.one_of(st.none(), st.floats(0, 10), st.sampled_from([1e-9, 1e300])),
        "usage_source": st.sampled_from([None, "reported", "estimated", "missing"]),
        "usage": st.fixed_dictionaries(
            {},
            optional={
                "input_tokens": st.integers(0, 2**40),
                "output_tokens": st.integers(0, 10_000),
                "cached_input_tokens": st.integers(0, 100),
            },
        ),
        "context": st.fixed_dictionaries(
            {},
            optional={
                "customer_id": _LABEL,
                "tenant_id": _LABEL,
                "section": _LABEL,
                "section_path": _LABEL,
            },
        ),
    },
    optional={"project": st.sampled_from([None, "p1", "p2", "P1"])},
)

_QUERIES: list[tuple[tuple[str, ...], dict[str, str]]] = [
    ((), {}),
    (("provider", "model"), {}),
    (("customer",), {"model": "m1"}),
    (("day",), {}),
    (("hour", "project"), {}),
    (("section_path", "tenant"), {"section_path": "a"}),
    (("section", "endpoint"), {"project": "p1", "kind": "span"}),
    # not dimensions of the rollup: read from the events
    (("outcome",), {}),
    (("provider",), {"outcome": "refused"}),
]


def _check_all(store: PgEventStore, windows: list[tuple[float | None, float | None]]) -> None:
    for since, until in windows:
        for by, filters in _QUERIES:
            got = store.report(by, since=since, until=until, **filters)
            want = _from_events(store, by, since=since, until=until, **filters)
            assert got == want, (by, filters, since, until)


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
def test_a_report_from_the_rollup_is_the_report_from_the_events(
    stores: tuple[PgEventStore, PgEventStore],
    events: list[dict[str, Any]],
    resent: list[int],
    cut: int,
    since: float | None,
    span: float,
) -> None:
    """Random events written by two writers in turns, some delivered twice:
    every report the rollup can answer (whole days and hours plus the
    window's edges) equals the report summed from the events, to the last digit, for
    all time, a random window and a window of whole hours; so does every
    report after retention drops the events before a random time."""
    first, second = stores
    with psycopg.connect(first.url, autocommit=True) as conn:
        conn.execute("TRUNCATE events, rollup_hourly, rollup_daily")
    half = len(events) // 2
    first.insert(events[:half])
    second.insert(events[half:])
    first.insert([events[i] for i in resent if i < len(events)])  # delivered twice
    windows = [
        (None, None),
        (since, None if since is None else since + span),
        (T0 + HOUR, T0 + 30 * HOUR),  # whole hours and edges
        (T0 + 0.5, T0 + 60 * HOUR + 0.5),  # whole days, whole hours and edges
    ]
    _check_all(first, windows)
    ((in_hours,),) = first.read(
        "SELECT count(*) FROM events WHERE kind = 'call' AND ts >= %s AND ts < %s",
        [FIRST_HOUR * HOUR, END_HOUR * HOUR],
    )
    assert (_rollup_rows(first) > 0) == (in_hours > 0)  # the rollup was there to read
    while second.drop_before(T0 + cut * HOUR, limit=7) == 7:
        pass
    _check_all(second, windows)


def test_two_writers_at_once_count_each_event_once(
    stores: tuple[PgEventStore, PgEventStore],
) -> None:
    """Two collectors writing the same events at the same time (a failover's
    resends), in batches, from two threads: no deadlock, no error, and the
    rollup counts every event once."""
    events = [
        {
            "id": f"w{i}",
            "kind": "call",
            "ts": T0 + (i % 50) * 600,
            "provider": ["openai", "anthropic"][i % 2],
            "model": f"m{i % 3}",
            "cost_usd": 0.001 * (i % 7),
            "usage": {"input_tokens": i},
            "context": {"customer_id": f"c{i % 4}"},
        }
        for i in range(3000)
    ]
    errors: list[BaseException] = []

    def write(store: PgEventStore) -> None:
        try:
            for k in range(0, len(events), 100):
                store.insert(events[k : k + 100])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    first = stores[0]
    assert first.count() == 3000
    (total,) = first.report(())
    assert total["calls"] == 3000 and total["input_tokens"] == sum(range(3000))
    for by in (("provider", "model"), ("customer", "hour")):
        assert first.report(by) == _from_events(first, by)


def test_the_migration_sums_the_events_already_stored(pg_url: str) -> None:
    """A database of schema 2 with events in it: migrating to the rollup's
    schema sums them, so reports read from it at once are right."""
    from llmobserve.collector import _pgstore

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE llmobserve_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, migration in enumerate(_pgstore.MIGRATIONS[:2], start=1):
            conn.execute(migration)
            conn.execute("INSERT INTO llmobserve_schema (version) VALUES (%s)", (number,))
    old = PgEventStore(pg_url, migrate=False)  # as an llmobserve before the rollup
    old.insert(
        [
            {
                "id": f"m{i}",
                "kind": "call",
                "ts": T0 + i * 900,
                "provider": "openai",
                "cost_usd": 0.5,
                "project": "p1" if i % 2 else None,
            }
            for i in range(100)
        ]
    )
    # llmobserve report on that database (it never migrates): from the events
    (before,) = old.report(())
    assert before["calls"] == 100
    old.close()
    reader = PgEventStore(pg_url, migrate=False)
    assert reader.report(("provider",)) == _from_events(reader, ("provider",))
    reader.close()
    store = PgEventStore(pg_url)
    try:
        assert _rollup_rows(store) > 0
        for by in ((), ("provider", "day"), ("project",)):
            assert store.report(by) == _from_events(store, by)
        (total,) = store.report(())
        assert total["calls"] == 100 and total["cost_usd"] == 50.0
    finally:
        store.close()


def test_a_project_jsonb_refuses_is_no_reason_to_refuse_the_event(
    stores: tuple[PgEventStore, PgEventStore],
) -> None:
    """An event whose extra JSON jsonb cannot read (a NUL in its project,
    written as \\u0000) is stored as it came, not as a rejected record, and
    counted in the rollup (with no project)."""
    store = stores[0]
    store.insert(
        [
            {"id": "nul", "kind": "call", "ts": T0, "provider": "openai", "project": "\x00"},
            {"id": "ok", "kind": "call", "ts": T0 + 1, "provider": "openai", "project": "p1"},
        ]
    )
    assert store.last_rejected == []
    assert store.event("nul")["project"] == "\x00"  # type: ignore[index]  # stored
    ((calls, projects),) = store.read(
        "SELECT sum(calls), array_agg(project ORDER BY project) FROM rollup_hourly"
    )
    assert calls == 2 and projects == ["p1", None]
    assert store.report(("provider",)) == _from_events(store, ("provider",))


def test_a_series_of_whole_hours_reads_the_rollup(
    stores: tuple[PgEventStore, PgEventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/api/timeseries in buckets of whole hours reads the store's report per
    hour (the rollup): the same series as summed from the events."""
    from llmobserve.collector import _insights

    store = stores[0]
    store.insert(
        [
            {
                "id": f"t{i}",
                "kind": "call",
                "ts": T0 + i * 397.3,
                "provider": ["openai", "anthropic", None][i % 3],
                "model": f"m{i % 4}",
                "cost_usd": None if i % 5 == 0 else 0.001 * i,
                "outcome": "refused" if i % 7 == 0 else "ok",
            }
            for i in range(600)
        ]
    )
    asked: list[tuple[str, ...]] = []
    report = store.report

    def counted(by: tuple[str, ...], **kw: Any) -> list[dict[str, Any]]:
        asked.append(by)
        return report(by, **kw)

    monkeypatch.setattr(store, "report", counted)
    cases = [("provider", 3600, {}), ("model", 3 * 3600, {"provider": "openai"})]
    got = [
        _insights.timeseries(store, by, bucket, T0 + 100, T0 + 60 * HOUR + 5, filters)
        for by, bucket, filters in cases
    ]
    assert asked == [("hour", "provider"), ("hour", "model")]
    monkeypatch.setattr(store, "rollup_answers", lambda by, filters: False)
    for (by, bucket, filters), series in zip(cases, got, strict=True):
        assert series == _insights.timeseries(
            store, by, bucket, T0 + 100, T0 + 60 * HOUR + 5, filters
        )
        assert sum(sum(s["calls"]) for s in series["series"]) > 0
