"""What only the PostgreSQL back end does: a shared database, migrations,
typed columns, connection loss (a real server, tests/support/postgres.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from llmobserve.collector import StoreError, open_store
from llmobserve.collector._pgstore import MIGRATIONS, PG_SCHEMA_VERSION, PgEventStore
from llmobserve.collector._store import EventStore, StoreUnavailable

T0 = 1_750_000_000.0


def call(i: int, **over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": f"e{i}",
        "kind": "call",
        "ts": T0 + i,
        "provider": "openai",
        "model": "gpt-4o",
        "cost_usd": 0.5,
        "usage": {"input_tokens": 100, "output_tokens": 10},
        "context": {"customer_id": "acme"},
    }
    event.update(over)
    return event


def test_open_store_picks_the_back_end(pg_url: str, tmp_path: Path) -> None:
    """A postgresql:// value opens PostgreSQL; anything else is a file."""
    pg = open_store(pg_url)
    lite = open_store(str(tmp_path / "x.sqlite3"))
    try:
        assert isinstance(pg, PgEventStore)
        assert isinstance(lite, EventStore)
    finally:
        pg.close()
        lite.close()


def test_two_collectors_on_one_database_store_each_event_once(pg_url: str) -> None:
    """The same events through two stores (two collectors, a failover
    resend): stored once; each insert counts only what was new."""
    a, b = PgEventStore(pg_url), PgEventStore(pg_url)
    try:
        assert a.insert([call(i) for i in range(10)], {"p1": 1}) == 10
        assert b.insert([call(i) for i in range(5, 15)], {"p1": 2}) == 5
        assert b.insert([call(3), call(3)]) == 0
        assert a.count() == b.count() == 15
        assert [e["id"] for e in a.events(limit=None)] == [f"e{i}" for i in range(15)]
        assert a.acked_seq("p1") == 2
    finally:
        a.close()
        b.close()


def test_a_duplicate_inside_one_batch_is_stored_once(pg_url: str) -> None:
    store = PgEventStore(pg_url)
    try:
        assert store.insert([call(1), call(1, model="other"), call(2)]) == 2
        assert [e["model"] for e in store.events()] == ["gpt-4o", "gpt-4o"]
    finally:
        store.close()


def test_migrations_are_recorded_and_run_once(pg_url: str) -> None:
    PgEventStore(pg_url).close()
    PgEventStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM llmobserve_schema ORDER BY 1")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert PG_SCHEMA_VERSION == len(MIGRATIONS)


def test_collectors_starting_together_migrate_once(pg_url: str) -> None:
    """The advisory lock: four stores opening a new database at once."""
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            PgEventStore(pg_url).close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    """A database migrated by a newer llmobserve: refused with a clear message."""
    PgEventStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO llmobserve_schema (version) VALUES (%s)", (PG_SCHEMA_VERSION + 1,)
        )
    with pytest.raises(StoreError, match="newer than this llmobserve"):
        PgEventStore(pg_url)
    with pytest.raises(StoreError, match="newer than this llmobserve"):
        PgEventStore(pg_url, migrate=False)


def test_a_reader_does_not_create_the_schema(pg_url: str) -> None:
    """migrate=False (the CLI, the collector's threads) creates nothing."""
    store = PgEventStore(pg_url, migrate=False)
    store.close()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT to_regclass('events')").fetchone()
    assert row == (None,)


def test_an_unreachable_server_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot open event store"):
        PgEventStore("postgresql://nobody:secret@127.0.0.1:1/x")


ODD = [
    call(1, model="nul\x00inside"),
    call(3, status="not a number"),
    call(4, status=200.5),
    call(5, cost_usd=float("nan")),
    call(6, status=2**70),
    call(7, id="id\x00with nul"),
    call(8, provider=7),
]


def test_values_the_typed_columns_refuse_read_back_as_on_sqlite(
    pg_url: str, tmp_path: Path
) -> None:
    """SQLite columns take any value; PostgreSQL's are typed. A batch with a
    value that does not fit is written again with it moved to the extra JSON:
    every event, and the other events of the batch, read back as on SQLite."""
    lite, pg = EventStore(tmp_path / "x.sqlite3"), PgEventStore(pg_url)
    try:
        batch = [call(0), *ODD, call(9)]
        assert lite.insert(batch) == pg.insert(batch) == len(batch)
        assert pg.events(limit=None) == lite.events(limit=None)
        assert pg.report(by=["provider"]) == lite.report(by=["provider"])
        assert pg.insert(batch) == 0  # and they dedupe on resend
        # (SQLite's driver cannot bind a lone surrogate; msgpack never decodes one)
        assert pg.insert([call(2, model="lone \udc80 surrogate")]) == 1
        assert pg.events(limit=None)[2]["model"] == "lone \udc80 surrogate"
    finally:
        lite.close()
        pg.close()


@pytest.fixture
def own_server(postgres_server: Any) -> Any:
    """A server of this test's own, to stop and start (L{postgres_server}'s binaries)."""
    from support.postgres import PostgresServer

    server = PostgresServer(postgres_server.bindir).init().start()
    yield server
    server.destroy()


def test_insert_waits_through_a_server_restart(own_server: Any) -> None:
    """Connection lost: insert reconnects with backoff and then commits; the
    events written before and during the outage are all there once."""
    said: list[str] = []
    store = PgEventStore(own_server.url(), log=said.append, outage_wait=60.0)
    try:
        assert store.insert([call(i) for i in range(100)]) == 100
        own_server.stop()
        restarted = threading.Timer(1.0, own_server.start)
        restarted.start()
        assert store.insert([call(i) for i in range(50, 200)]) == 100
        restarted.join()
        assert store.count() == 200
        assert said[0].startswith("PostgreSQL connection lost")
        assert said[-1] == "PostgreSQL connection back; writing again"
    finally:
        store.close()


def test_insert_gives_up_after_the_outage_bound(own_server: Any) -> None:
    """No server for longer than outage_wait: StoreUnavailable (nothing is
    acknowledged); the backoff doubles; reads say unavailable too."""
    sleeps: list[float] = []
    store = PgEventStore(own_server.url(), outage_wait=3.0, sleep=sleeps.append)
    try:
        own_server.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.insert([call(1)])
        assert sleeps[:4] == [0.1, 0.2, 0.4, 0.8]
        with pytest.raises(StoreUnavailable):
            store.count()
        own_server.start()
        assert store.insert([call(1)]) == 1
    finally:
        store.close()


def test_the_command_line_reads_a_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    """llmobserve report/events --db postgresql://... answer as for a SQLite file."""
    import io
    import json as jsonlib

    from llmobserve.cli import main

    lite, pg = EventStore(tmp_path / "x.sqlite3"), PgEventStore(pg_url)
    batch = [call(i, model=f"m{i % 3}") for i in range(12)]
    lite.insert(batch)
    pg.insert(batch)
    lite.close()
    pg.close()
    answers = []
    for db in (str(tmp_path / "x.sqlite3"), pg_url):
        report, events = io.StringIO(), io.StringIO()
        assert main(["report", "--db", db, "--by", "model", "--format", "json"], out=report) == 0
        assert main(["events", "--db", db, "--format", "jsonl"], out=events) == 0
        answers.append((jsonlib.loads(report.getvalue()), events.getvalue()))
    assert answers[0] == answers[1]
    assert len(answers[1][1].splitlines()) == 12


def test_a_thread_store_opened_while_the_server_is_away_connects_later(own_server: Any) -> None:
    """migrate=False (the collector's threads): a server away at opening is
    not an error; the first operation connects, checking the schema."""
    PgEventStore(own_server.url()).close()  # the start-up's migration
    own_server.stop()
    store = PgEventStore(own_server.url(), migrate=False, outage_wait=60.0)
    try:
        own_server.start()
        assert store.insert([call(1)]) == 1
        assert store.count() == 1
    finally:
        store.close()


def test_a_row_the_server_still_refuses_is_stored_rejected_alone(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should making rows fit ever miss a case, the batch goes row by row and
    the row the server refuses becomes a rejected record (its id and the
    reason), as on SQLite: the other events and the acked seq are stored."""
    from llmobserve.collector import _pgstore

    monkeypatch.setattr(_pgstore, "_fitted", lambda row: row + _pgstore._PADS[len(row)])
    store = PgEventStore(pg_url)
    try:
        assert store.insert([call(0), call(1, model="a\x00b"), call(2)], {"p": 7}) == 3
        assert [r[0] for r in store.last_rejected] == ["e1"]
        kinds = {e["id"]: e["kind"] for e in store.events(limit=None)}
        assert kinds == {"e0": "call", "e1": "rejected", "e2": "call"}
        assert store.events(kind="rejected")[0]["reason"] == store.last_rejected[0][1]
        assert store.acked_seq("p") == 7
    finally:
        store.close()
