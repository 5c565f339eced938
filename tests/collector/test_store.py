"""The event store's contract, run on both back ends, and SQLite's own tests.

The C{store} fixture yields a SQLite L{EventStore} and a PostgreSQL
L{PgEventStore} (a real server, tests/support/postgres.py): every test
taking it is the contract both back ends keep.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from llmobserve.collector._store import CALL_FIELDS, EventStore, StoreError

DAY = 86400.0
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def call(i: int, **over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": f"e{i}",
        "kind": "call",
        "ts": T0 + i,
        "duration_ms": 10.0,
        "ttfb_ms": 2.0,
        "overhead_ms": 0.1,
        "method": "POST",
        "host": "api.openai.com",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "provider": "openai",
        "endpoint": "chat.completions",
        "model": "gpt-4o",
        "streamed": False,
        "usage": {"input_tokens": 100, "output_tokens": 10},
        "usage_source": "reported",
        "cost_usd": 0.5,
        "price_ref": {"source": "genai-prices", "model": "gpt-4o"},
        "request_bytes": 300,
        "response_bytes": 400,
        "graphql": None,
        "context": {"run_id": "r1", "customer_id": "acme", "section": "plan"},
    }
    event.update(over)
    return event


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        s: Any = EventStore(tmp_path / "sub" / "events.sqlite3")
    else:
        from llmobserve.collector._pgstore import PgEventStore

        s = PgEventStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def test_wal_mode_and_parent_dir(tmp_path: Path) -> None:
    """The store creates its directory and runs in WAL mode."""
    path = tmp_path / "a" / "b" / "x.sqlite3"
    EventStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_round_trip_every_design_field(store: EventStore) -> None:
    """An event read back equals the one written, field for field."""
    event = call(1)
    assert store.insert([event]) == 1
    (got,) = store.events()
    assert got == event
    assert set(CALL_FIELDS) <= set(got)


def test_dedup_on_id(store: EventStore) -> None:
    """Inserting the same id twice stores it once; the count says so."""
    assert store.insert([call(1), call(2)]) == 2
    assert store.insert([call(2), call(3), call(3)]) == 1
    assert store.count() == 3
    # the first write wins: a resend cannot rewrite history
    store.insert([call(1, cost_usd=99.0)])
    assert store.events(limit=1)[0]["cost_usd"] == 0.5


def test_null_cost_stays_null(store: EventStore) -> None:
    """C{cost_usd: null} is read back as null, never as 0."""
    store.insert([call(1, cost_usd=None)])
    (got,) = store.events()
    assert "cost_usd" in got and got["cost_usd"] is None
    (row,) = store.report(["provider"])
    assert row["cost_usd"] is None
    assert row["unpriced_calls"] == 1


def test_unknown_keys_kept(store: EventStore) -> None:
    """Unknown keys, and known keys of a surprising type, survive in extra."""
    event = call(
        1,
        brand_new={"nested": [1, 2]},
        parse_error="bad json",
        flags=["parse_skipped"],
        status="two hundred",  # wrong type for the INTEGER column
        request_bytes=2**70,  # too big for SQLite INTEGER
        ts=float("nan"),  # not finite
        blob=b"\xff\x00raw",
    )
    store.insert([event])
    (got,) = store.events()
    assert got["brand_new"] == {"nested": [1, 2]}
    assert got["parse_error"] == "bad json"
    assert got["flags"] == ["parse_skipped"]
    assert got["status"] == "two hundred"
    assert got["request_bytes"] == 2**70
    assert got["ts"] is None  # NaN cannot be stored as JSON: kept as null
    assert got["blob"] == "\ufffd\x00raw"


def test_spans_and_gaps_stored(store: EventStore) -> None:
    """Span and gap records are stored and queryable, not counted as calls."""
    span = {
        "id": "s1",
        "kind": "span",
        "ts": T0,
        "span_id": "sp1",
        "run_id": "r9",
        "name": "plan",
        "section_path": "agent/plan",
        "duration_ms": 5.0,
    }
    gap = {"id": "g1", "kind": "gap", "ts": T0 + 1, "dropped": 17, "reason": "spool full"}
    store.insert([span, gap, call(1)])
    assert store.events(kind="span") == [span]
    assert store.events(kind="gap") == [gap]
    # top-level labels of a span are queryable like a call's context
    assert store.events(run="r9") == [span]
    (row,) = store.report([])
    assert row["calls"] == 1


def test_event_without_id_gets_a_stable_one(store: EventStore) -> None:
    """An event with no id is stored under a content hash, so a resend dedupes."""
    event = {"kind": "call", "ts": T0, "provider": "x"}
    assert store.insert([event]) == 1
    assert store.insert([dict(event)]) == 0
    (got,) = store.events()
    assert got["id"].startswith("noid-")


def test_filters_and_paging(store: EventStore) -> None:
    """Every filter narrows; since/until bound ts; limit/offset page in ts order."""
    store.insert(
        [
            call(1, provider="openai", model="gpt-4o"),
            call(2, provider="anthropic", model="claude", outcome="upstream_error"),
            call(3, context={"customer_id": "globex", "tenant_id": "t2", "run_id": "r2"}),
            call(4, context={"section": "x", "section_path": "agent/plan/x"}),
            call(5, context={"section_path": "agent/planner"}),
        ]
    )

    def ids(evs: list[dict[str, Any]]) -> list[str]:
        return [e["id"] for e in evs]

    assert ids(store.events(provider="anthropic")) == ["e2"]
    assert ids(store.events(model="gpt-4o")) == ["e1", "e3", "e4", "e5"]
    assert ids(store.events(outcome="upstream_error")) == ["e2"]
    assert ids(store.events(customer="globex")) == ["e3"]
    assert ids(store.events(tenant="t2")) == ["e3"]
    assert ids(store.events(run="r2")) == ["e3"]
    assert ids(store.events(section="x")) == ["e4"]
    assert ids(store.events(section_path="agent/plan")) == ["e4"]  # not agent/planner
    assert ids(store.events(since=T0 + 2, until=T0 + 4)) == ["e2", "e3"]
    assert ids(store.events(limit=2, offset=1)) == ["e2", "e3"]
    assert ids(store.events(limit=None)) == ["e1", "e2", "e3", "e4", "e5"]
    with pytest.raises(StoreError):
        store.events(colour="red")


def test_report_grouping(store: EventStore) -> None:
    """Reports sum cost and tokens and count calls per group, costliest first."""
    store.insert(
        [
            call(1, cost_usd=1.0, usage={"input_tokens": 10, "output_tokens": 1}),
            call(2, cost_usd=2.0, usage={"input_tokens": 20, "cached_input_tokens": 5}),
            call(3, provider="anthropic", model="claude", cost_usd=5.0),
            call(4, ts=T0 + DAY, cost_usd=None, context={"customer_id": "globex"}),
        ]
    )
    rows = store.report(["provider", "model"])
    assert [(r["provider"], r["model"], r["calls"]) for r in rows] == [
        ("anthropic", "claude", 1),
        ("openai", "gpt-4o", 3),
    ]
    openai = rows[1]
    assert openai["cost_usd"] == 3.0
    assert openai["unpriced_calls"] == 1
    assert openai["input_tokens"] == 130
    assert openai["cached_input_tokens"] == 5
    assert openai["output_tokens"] == 11

    by_customer = {r["customer"]: r["calls"] for r in store.report(["customer"])}
    assert by_customer == {"acme": 3, "globex": 1}
    by_day = {r["day"]: r["calls"] for r in store.report(["day"])}
    assert by_day == {"2025-06-15": 3, "2025-06-16": 1}
    by_hour = store.report(["hour"], since=T0, until=T0 + 10)
    assert by_hour == [
        {
            "hour": "2025-06-15T15:00Z",
            "calls": 3,
            "cost_usd": 8.0,
            "unpriced_calls": 0,
            "input_tokens": 130,
            "cached_input_tokens": 5,
            "cache_write_tokens": 0,
            "output_tokens": 11,
            "reasoning_tokens": 0,
            "estimated_cost_usd": None,
            "estimated_calls": 0,
        }
    ]
    for by in (["endpoint"], ["tenant"], ["section"], ["section_path"], ["run"]):
        assert sum(r["calls"] for r in store.report(by)) == 4
    assert store.report(["provider"], provider="anthropic")[0]["calls"] == 1
    with pytest.raises(StoreError):
        store.report(["colour"])


def test_acked_seqs_persist(tmp_path: Path) -> None:
    """Each proxy's last acked seq is kept with the commit and survives a reopen."""
    path = tmp_path / "x.sqlite3"
    s = EventStore(path)
    s.insert([call(1)], {"proxy-a": 4})
    s.insert([call(2)], {"proxy-b": 1})
    s.insert([], {"proxy-a": 9})
    s.close()
    s = EventStore(path)
    assert s.acked_seq("proxy-a") == 9
    assert s.acked_seq("proxy-b") == 1
    assert s.acked_seq("nobody") is None
    assert s.links() == {"proxy-a": 9, "proxy-b": 1}
    assert s.count() == 2
    s.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    """A store written by a newer version is refused, not damaged."""
    path = tmp_path / "x.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        EventStore(path)


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite gives a StoreError naming it."""
    path = tmp_path / "x.sqlite3"
    path.write_bytes(b"hello, this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        EventStore(path)


def test_reader_sees_commits_while_writer_open(tmp_path: Path) -> None:
    """A second connection (another thread) reads what the writer committed."""
    path = tmp_path / "x.sqlite3"
    writer = EventStore(path)
    writer.insert([call(1)])
    seen: list[int] = []

    def read() -> None:
        r = EventStore(path)
        seen.append(r.count())
        r.close()

    t = threading.Thread(target=read)
    t.start()
    t.join(10)
    writer.close()
    assert seen == [1]


def test_fast_and_careful_rows_agree() -> None:
    """The fast row builder gives the careful one's row, or hands the event over."""
    from llmobserve.collector._store import _fast_row, _row

    cases = [
        call(1),
        call(2, streamed=True, proxy_id="p", flags=["x"], parse_error=None),
        call(3, context=None, usage=None, price_ref="genai-prices:gpt-4o"),
        call(4, graphql={"operation_type": "query", "depth": 3}, brand_new=[1, "é"]),
        call(6, status=True),  # a bool outside streamed
        call(7, ts=float("inf")),
        call(8, context={"customer_id": 7}),  # a non-str label
        call(9, run_id="top-level"),  # a span-style label
        {"kind": "call", "ts": T0},  # no id
        {"id": "k", "ts": T0, "extra_a": 1, "extra_b": {"n": None}},  # no kind
        # what a proxy sends: empty context and flags, a price_ref string, its id
        call(10, context={}, flags=[], price_ref="genai-prices:openai/gpt-4o", proxy_id="p1"),
        call(11, context={}, flags=[], price_ref="genai-prices:openai/gpt-4o", proxy_id="p1"),
        call(12, proxy_id=7, flags=("a",), price_ref=["x"]),  # not remembered: other types
    ]
    assert _fast_row(call(13, kind=float("nan"))) is None  # stored "call" only by _row
    for event in cases:
        fast = _fast_row(event)
        if fast is not None:
            assert fast == _row(event), event


def test_round_trip_through_the_fast_path(store: EventStore) -> None:
    """Ordinary proxy events (bool streamed, unknown keys, unicode) read back equal."""
    events = [
        call(i, streamed=bool(i % 2), proxy_id="proxy-1", flags=[], parse_error="e")
        for i in range(5)
    ]
    events.append(call(9, model="modèle-ü", context={"properties": {"k": "v"}}, a=1, b=2))
    assert store.insert(events) == len(events)
    assert store.events(limit=None) == events
    assert [e["id"] for e in store.events(customer="acme", limit=None)] == [
        f"e{i}" for i in range(5)
    ]
    assert store.report([])[0]["input_tokens"] == 600


def test_rows_made_ahead_store_what_insert_stores(tmp_path: Path) -> None:
    """insert_rows(row_for(e)...) and insert(events) leave the same table;
    a row that sqlite3 refuses (an integer past 64 bits) raises OverflowError
    and writes nothing."""
    events = [call(i, streamed=bool(i % 2), proxy_id="p", flags=["x"]) for i in range(4)]
    rows = [EventStore.row_for(e) for e in events]
    assert None not in rows
    ahead, plain = EventStore(tmp_path / "a.sqlite3"), EventStore(tmp_path / "b.sqlite3")
    try:
        assert ahead.insert_rows(rows) == 4  # type: ignore[arg-type]  # no None left
        assert ahead.insert_rows(rows) == 0  # type: ignore[arg-type]  # deduplicated
        assert plain.insert(events) == 4
        assert ahead.events(limit=None) == plain.events(limit=None) == events
        big = EventStore.row_for(call(9, cost_usd=2**70))
        assert big is not None
        with pytest.raises(OverflowError):
            ahead.insert_rows([EventStore.row_for(call(8)), big])  # type: ignore[list-item]  # a row
        assert ahead.count() == 4
    finally:
        ahead.close()
        plain.close()


def test_rows_leave_out_their_trailing_nulls() -> None:
    """sqlite3 binds each None slowly, so a row stops at its last value: an
    ordinary proxy call (no labels, no GraphQL, no error) binds its head
    columns and its token counts only; a late column set keeps the NULLs
    before it. Both row builders trim alike."""
    from llmobserve.collector._store import _MIN_ROW, _ROW_COLUMNS, _fast_row, _row

    plain = call(1, context={}, flags=[], proxy_id="p1")
    row = _fast_row(plain)
    assert row is not None and row == _row(plain)
    assert _ROW_COLUMNS[len(row) - 1] == "output_tokens"
    assert None not in row
    labelled = _fast_row(call(2, context={"customer_id": "acme"}, proxy_id="p1"))
    assert labelled is not None and _ROW_COLUMNS[len(labelled) - 1] == "customer_id"
    errored = _row(call(3, parse_error="bad json"))
    assert len(errored) == len(_ROW_COLUMNS) - 1  # up to parse_error; dropped is NULL
    gap = _row({"id": "g", "kind": "gap", "ts": T0, "dropped": 5})
    assert len(gap) == len(_ROW_COLUMNS) and len(gap) > _MIN_ROW


def test_rows_of_different_lengths_keep_their_order(store: EventStore) -> None:
    """Runs of equal-length rows share a statement, but rows are written in
    the order given (rowid breaks ties between equal timestamps), with or
    without pauses between chunks."""
    shapes: list[dict[str, Any]] = [
        {"context": {}},
        {"context": {"customer_id": "acme"}},
        {"context": {}, "parse_error": "e"},
        {"context": {}},
        {"context": {}, "graphql": {"operation_type": "query"}},
    ]
    events = [call(i, ts=T0, **shape) for i, shape in enumerate(shapes)]
    rows = [EventStore.row_for(e) for e in events]
    assert len({len(r) for r in rows if r is not None}) == 4
    assert store.insert_rows(rows, pause=lambda: None, chunk=2) == 5  # type: ignore[arg-type]  # no None
    assert store.events(limit=None) == events


def test_rows_go_in_chunks_with_a_pause_between_them(tmp_path: Path) -> None:
    """insert_rows(pause=...) calls it between chunks, all in one transaction
    (SQLite only: the proxy's embedded store)."""
    store = EventStore(tmp_path / "x.sqlite3")
    rows = [EventStore.row_for(call(i)) for i in range(20)]
    pauses: list[bool] = []

    def pause() -> None:
        pauses.append(store._db.in_transaction)

    assert store.insert_rows(rows, pause=pause, chunk=8) == 20  # type: ignore[arg-type]  # no None
    assert pauses == [True, True]  # after rows 8 and 16, inside the transaction
    assert store.count() == 20


def test_big_integers_round_trip_exactly(store: EventStore) -> None:
    """Integers past 64 bits stay exact (orjson reads them as floats; we do not)."""
    store.insert([call(1, usage={"input_tokens": 2**70, "output_tokens": 3}, big=-(2**65))])
    (got,) = store.events()
    assert got["usage"] == {"input_tokens": 2**70, "output_tokens": 3}
    assert got["big"] == -(2**65)
    assert store.report([])[0]["input_tokens"] == 0  # not countable as a column


def test_json_columns_are_valid_json(tmp_path: Path) -> None:
    """What the JSON columns hold is JSON text SQLite itself can read."""
    path = tmp_path / "x.sqlite3"
    s = EventStore(path)
    s.insert([call(1, flags=["a"], surprise={"x": [1.5, None]}, blob=b"\xff")])
    s.close()
    db = sqlite3.connect(path)
    row = db.execute(
        "SELECT json_extract(usage, '$.input_tokens'), json_extract(context, '$.run_id'),"
        " json_extract(price_ref, '$.model'), json_extract(flags, '$[0]'),"
        " json_extract(extra, '$.surprise.x[0]'), typeof(usage), json_valid(extra) FROM events"
    ).fetchone()
    db.close()
    assert row == (100, "r1", "gpt-4o", "a", 1.5, "text", 1)


def test_store_written_by_the_previous_version_reads(tmp_path: Path) -> None:
    """A file written with the stdlib encoder (the previous version) reads the same."""
    import json

    path = tmp_path / "x.sqlite3"
    s = EventStore(path)
    s.close()
    db = sqlite3.connect(path)
    cols = [r[1] for r in db.execute("PRAGMA table_info(events)")]
    row = dict.fromkeys(cols)
    row.update(
        id="old1",
        kind="call",
        ts=T0,
        provider="openai",
        streamed=1,
        usage=json.dumps({"input_tokens": 5}, separators=(",", ":")),
        context=json.dumps({"run_id": "r", "label": "\u00e9"}),  # ensure_ascii escapes
        extra=json.dumps({"proxy_id": "p", "n": 2**70}),
        run_id="r",
        input_tokens=5,
    )
    db.execute(
        f"INSERT INTO events ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    db.commit()
    db.close()
    s = EventStore(path)
    (got,) = s.events()
    s.close()
    assert got["usage"] == {"input_tokens": 5}
    assert got["context"] == {"run_id": "r", "label": "é"}
    assert got["proxy_id"] == "p" and got["n"] == 2**70
    assert got["streamed"] is True


def test_a_new_store_gets_16k_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """Bigger pages for new files (fewer page writes per commit); a file made
    with other pages opens as it is, contents intact."""
    import sqlite3

    fresh = EventStore(tmp_path / "new.sqlite3")
    assert fresh._db.execute("PRAGMA page_size").fetchone() == (16384,)
    fresh.close()
    old_path = tmp_path / "old.sqlite3"
    old_db = sqlite3.connect(old_path)
    old_db.execute("PRAGMA page_size=4096")
    old_db.execute("CREATE TABLE earlier (x)")  # the file exists with 4 KiB pages
    old_db.close()
    old = EventStore(old_path)
    old.insert([call(1)])
    old.close()
    old = EventStore(old_path)
    assert old._db.execute("PRAGMA page_size").fetchone() == (4096,)
    assert [e["id"] for e in old.events(limit=None)] == ["e1"]
    old.close()


def nested(depth: int) -> Any:
    """A value nesting maps and lists C{depth} levels deep."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_an_event_nested_too_deep_is_stored_rejected_alone(store: EventStore) -> None:
    """An event nested 800 levels deep (in a known field, an unknown key, or
    without an id) becomes a rejected record with its reason; the events
    around it in the same insert are stored as they were (it made the whole
    transaction raise RecursionError and roll back)."""
    batch = [
        call(1),
        {**call(2), "graphql": nested(800)},
        {"kind": "call", "ts": T0 + 3, "blob": nested(800)},
        {**call(4), "context": {"properties": {"x": nested(100)}}},
        call(5),
    ]
    assert store.insert(batch) == 5
    assert [r for _, r in store.last_rejected] == ["nested deeper than 64 levels"] * 3
    stored = {e["id"]: e for e in store.events(limit=None)}
    assert stored["e1"]["model"] == "gpt-4o" and stored["e1"]["usage"] == call(1)["usage"]
    assert stored["e5"]["usage"] == call(5)["usage"]
    rejected = store.events(kind="rejected", limit=None)
    assert {e["id"] for e in rejected} == {"e2", "e4", store.last_rejected[1][0]}
    assert store.last_rejected[1][0].startswith("rejected-")
    for e in rejected:
        assert e["reason"] == "nested deeper than 64 levels"
        assert e["ts"] in (T0 + 2, T0 + 3, T0 + 4)
    # a rejected record is no call: the report does not count it
    assert store.report([])[0]["calls"] == 2
    # a resend of the same batch stores nothing twice
    assert store.insert(batch) == 0 and store.count() == 5


def test_nesting_up_to_the_bound_is_stored(store: EventStore) -> None:
    """An event of exactly 64 levels is stored whole (fast and careful path);
    65 is rejected."""
    ok = {**call(1), "graphql": nested(63)}
    ok_careful = {**call(2), "graphql": nested(62), "blob": {2**70: nested(61)}}
    too_deep = {**call(3), "graphql": nested(64)}
    assert store.insert([ok, ok_careful, too_deep]) == 3
    assert [i for i, _ in store.last_rejected] == ["e3"]
    (back,) = store.events(kind="call", limit=1)
    assert back["graphql"] == nested(63)


def test_any_exception_of_one_event_rejects_it_alone(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever turning one event into a row raises, that event is a rejected
    record with the exception as its reason and the rest are stored."""
    from llmobserve.collector import _store

    real = _store._row

    def row(event: Any) -> Any:
        if event.get("model") == "boom":
            raise RuntimeError("boom")
        return real(event)

    monkeypatch.setattr(_store, "_row", row)
    # a top-level label sends the event down the careful path (_row)
    assert store.insert([call(1), call(2, model="boom", run_id="r"), call(3)]) == 3
    assert store.last_rejected == [("e2", "RuntimeError: boom")]


def test_report_leaves_out_calls_the_proxy_answered_itself(store: EventStore) -> None:
    """C{refused} and C{proxy_error} calls went nowhere: they are not in a report's
    call counts (issue 14, item 12) unless the outcome filter asks for them."""
    store.insert(
        [
            call(1),
            call(2, outcome="refused", status=403, provider="unknown", cost_usd=None),
            call(3, outcome="proxy_error", status=502, provider="unknown", cost_usd=None),
            call(4, outcome="upstream_error", status=429, cost_usd=None),
        ]
    )
    [total] = store.report([])
    assert (total["calls"], total["unpriced_calls"]) == (2, 1)
    assert [r["provider"] for r in store.report(["provider"])] == ["openai"]
    [refused] = store.report([], outcome="refused")
    assert refused["calls"] == 1


def test_drop_before_deletes_old_events_in_chunks(store: EventStore) -> None:
    """Retention: events with ts < cutoff go, at most limit a call; events
    without a ts stay; what is left reads and reports as before."""
    store.insert([call(i, ts=T0 + i) for i in range(25)])
    store.insert([{"id": "no-ts", "kind": "span"}])
    assert store.drop_before(T0 + 20, limit=8) == 8
    assert store.drop_before(T0 + 20, limit=8) == 8
    assert store.drop_before(T0 + 20, limit=8) == 4
    assert store.drop_before(T0 + 20, limit=8) == 0
    assert store.count() == 6
    assert [e["id"] for e in store.events(kind="call")] == [f"e{i}" for i in range(20, 25)]
    assert store.report(by=())[0]["calls"] == 5
