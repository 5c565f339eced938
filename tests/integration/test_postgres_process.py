"""Real collectors on a real PostgreSQL server: outage and failover, nothing lost.

A proxy sends chat calls through a real C{twistd llmobserve} to collectors
storing into PostgreSQL (tests/support/postgres.py). The server restarted
mid-ingest: the collector stops acknowledging, reconnects, and every event
is stored once. Two collectors on one store (a PostgreSQL database, or one
SQLite file: the C{shared_db} fixture), one SIGKILLed mid-run: the proxy
moves to the other (C{--collector} twice) and every event is stored
exactly once.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.clients import RawClient, chat_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.stores import StoreUnreadable, row
from support.upstreams import RecordingUpstream


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _stored(db: str) -> tuple[int, int]:
    """(rows, distinct ids) of call events in the store."""
    rows, ids = row(db, "SELECT count(*), count(DISTINCT id) FROM events WHERE kind = 'call'")
    return int(rows), int(ids)


def _stored_or_zero(db: str) -> int:
    try:
        return _stored(db)[0]
    except StoreUnreadable:
        return 0


class _Caller(threading.Thread):
    """Makes C{calls} chat calls through the proxy on one keep-alive connection."""

    def __init__(self, proxy_port: int, upstream_url: str, calls: int) -> None:
        super().__init__(daemon=True)
        self.proxy_port = proxy_port
        self.request = chat_request(proxy_port, upstream_url)
        self.calls = calls
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with RawClient(self.proxy_port) as client:
                for _ in range(self.calls):
                    client.send(self.request)
                    assert client.read_response(method="POST").status == 200
                    self.done += 1
        except BaseException as e:
            self.error = e


def _proxy(tmp_path: Path, upstream: RecordingUpstream, collectors: list[str]) -> ProxyProcess:
    args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
    for url in collectors:
        args += ["--collector", url]
    return ProxyProcess(args, workdir=tmp_path / "proxy")


@pytest.mark.timeout(150)
def test_a_server_restart_mid_ingest_loses_nothing(tmp_path: Path, postgres_server: Any) -> None:
    """1,000 calls; the PostgreSQL server stopped for 2 s after the first
    ~300 are stored: the collector logs the loss, acknowledges nothing
    meanwhile, reconnects, and the database ends with 1,000 calls, once each."""
    from support.postgres import PostgresServer

    calls = 1000
    server = PostgresServer(postgres_server.bindir).init().start()
    try:
        url = server.url()
        with RecordingUpstream() as upstream:
            collector = CollectorProcess(db=url, workdir=tmp_path / "collector")
            with collector, _proxy(tmp_path, upstream, [collector.url]) as proxy:
                caller = _Caller(proxy.port, upstream.url, calls)
                caller.start()
                _wait_for(lambda: _stored_or_zero(url) >= 300, 60, "300 calls stored")
                server.stop()
                time.sleep(2.0)
                server.start()
                caller.join(90)
                assert caller.error is None and caller.done == calls
                _wait_for(lambda: _stored_or_zero(url) >= calls, 60, "every call stored")
                _wait_for(
                    lambda: _get_json(proxy.url + "/health")["events_waiting"] == 0,
                    30,
                    "the proxy's spool to drain",
                )
                assert _stored(url) == (calls, calls)
                log = collector.log_text()
                assert "PostgreSQL connection lost" in log
                assert "PostgreSQL connection back" in log
    finally:
        server.destroy()


@pytest.mark.timeout(150)
def test_failover_between_two_collectors_stores_every_event_once(
    tmp_path: Path, shared_db: str
) -> None:
    """Two collectors on one store, a proxy naming both; 2,000 calls, the
    first collector SIGKILLed once ~500 are stored: the proxy resends what
    was not acknowledged to the second, and every call is stored exactly once."""
    calls = 2000
    with RecordingUpstream() as upstream:
        first = CollectorProcess(db=shared_db, workdir=tmp_path / "c1")
        second = CollectorProcess(db=shared_db, workdir=tmp_path / "c2")
        with first, second:
            with _proxy(tmp_path, upstream, [first.url, second.url]) as proxy:
                caller = _Caller(proxy.port, upstream.url, calls)
                caller.start()
                _wait_for(lambda: _stored_or_zero(shared_db) >= 500, 60, "500 calls stored")
                first.kill()
                caller.join(120)
                assert caller.error is None and caller.done == calls
                _wait_for(lambda: _stored_or_zero(shared_db) >= calls, 60, "every call stored")
                _wait_for(
                    lambda: _get_json(proxy.url + "/health")["events_waiting"] == 0,
                    30,
                    "the proxy's spool to drain",
                )
                assert _stored(shared_db) == (calls, calls)
                assert _get_json(second.url + "/health")["events_stored"] > 0


def _run_collector(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    import subprocess

    proc = CollectorProcess(workdir=tmp_path / "refused", env=env)
    command = proc.command()
    command[command.index("--port") :] = ["--port", "tcp:0:interface=127.0.0.1", *args]
    proc.workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=proc.environment(),
        cwd=proc.workdir,
        timeout=60,
        check=False,
    )


def test_a_collector_refuses_a_newer_schema_in_one_line(tmp_path: Path, pg_url: str) -> None:
    """A database migrated by a newer llmobserve: the collector does not
    start, and says why (the schema version) without a traceback."""
    from llmobserve.collector._pgstore import PG_SCHEMA_VERSION, PgEventStore

    PgEventStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO llmobserve_schema (version) VALUES (%s)", (PG_SCHEMA_VERSION + 5,)
        )
    out = _run_collector(tmp_path, "--db", pg_url)
    assert out.returncode != 0
    assert f"store schema {PG_SCHEMA_VERSION + 5}" in out.stderr
    assert "newer than this llmobserve" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_llmobserve_db_names_the_database(tmp_path: Path, pg_url: str) -> None:
    """Without --db, LLMOBSERVE_DB: the collector creates its schema there."""
    collector = CollectorProcess(workdir=tmp_path / "env", env={"LLMOBSERVE_DB": pg_url})
    command = collector.command()
    at = command.index("--db")
    del command[at : at + 2]
    collector.command = lambda: command  # type: ignore[method-assign]  # this process starts with its own command
    with collector:
        assert _get_json(collector.url + "/health")["events_stored"] == 0
    assert _stored(pg_url) == (0, 0)  # the events table exists


def _varied_events(n: int) -> list[dict[str, Any]]:
    """C{n} calls over about ten hours (providers, models, customers, unpriced
    and refused calls, errors, estimated usage, a run) and a span."""
    t0 = 1_750_003_200.0  # on the hour
    events: list[dict[str, Any]] = [
        {"id": "span-1", "kind": "span", "ts": t0 + 5, "run_id": "run-7", "name": "plan"}
    ]
    for i in range(n):
        refused = i % 17 == 3
        events.append(
            {
                "id": f"pg-dash-{i:04d}",
                "kind": "call",
                "ts": t0 + i * 61.5,
                "provider": ["openai", "anthropic", "gemini"][i % 3],
                "model": f"m{i % 4}",
                "endpoint": "chat.completions",
                "status": 403 if refused else 500 if i % 11 == 0 else 200,
                "outcome": "refused" if refused else "ok",
                "duration_ms": 50.0 + (i * 37) % 900,
                "cost_usd": None if refused or i % 7 == 0 else 0.0001 * (1 + i % 9),
                "price_ref": "not priced" if refused else f"unknown model m{i % 2}",
                "usage_source": "missing" if refused else "estimated" if i % 5 == 1 else "reported",
                "usage": {} if refused else {"input_tokens": i % 50, "output_tokens": i % 13},
                "context": {
                    "customer_id": f"c{i % 6}",
                    "section_path": f"s{i % 2}/t{i % 3}",
                    **({"run_id": "run-7"} if i % 50 == 0 else {}),
                },
            }
        )
    return events


def _deliver(port: int, events: list[dict[str, Any]]) -> None:
    """Send C{events} over one LINK.md connection (twice: the second time as
    a resend after a lost ack) and wait for every ack."""
    import socket

    from llmobserve.events._codec import MAGIC, FrameDecoder, encode_frame

    batches = [events[i : i + 200] for i in range(0, len(events), 200)]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        decoder = FrameDecoder()
        sock.sendall(MAGIC + encode_frame({"t": "hello", "proxy_id": "dash-1", "version": 1}))
        for seq, batch in enumerate([*batches, *batches]):
            sock.sendall(encode_frame({"t": "batch", "seq": seq, "events": batch}))
        acked = -1
        while acked < 2 * len(batches) - 1:
            data = sock.recv(65536)
            assert data, "the collector closed the link"
            for message in decoder.feed(data):
                if message.get("t") == "ack":
                    acked = int(message["seq"])


@pytest.mark.timeout(120)
def test_the_dashboard_api_answers_alike_on_postgres_and_sqlite(
    tmp_path: Path, pg_url: str
) -> None:
    """A PostgreSQL collector and a SQLite one, fed the same events (each
    delivered twice) over the link: /api/summary, /api/timeseries,
    /api/report, /api/runs/ID and /api/events/ID answer with the same
    figures (they were 501 on PostgreSQL), an all-time summary's latency
    percentiles included (PostgreSQL's were exact where SQLite's came from
    its histogram: they now come from the same buckets on both)."""
    events = _varied_events(600)
    t0 = events[1]["ts"]
    short = f"since={t0 + 600}&until={t0 + 7200}"  # under three hours: events on both
    paths = [
        f"/api/summary?{short}",
        f"/api/summary?{short}&provider=openai",
        f"/api/summary?since={t0 - 1}&until={t0 + 40_000}&customer=c1",
        f"/api/timeseries?{short}&bucket=10m",
        f"/api/timeseries?since={t0}&until={t0 + 40_000}&bucket=1h&by=model",
        f"/api/timeseries?since={t0 - 1}&until={t0 + 4 * 86_400}&bucket=1d",
        f"/api/report?by=customer&since={t0}&until={t0 + 40_000}",
        "/api/runs/run-7",
        "/api/events/pg-dash-0042",
    ]
    answers: dict[str, list[Any]] = {}
    for name, db in (("postgres", pg_url), ("sqlite", str(tmp_path / "events.sqlite3"))):
        with CollectorProcess(db=db, workdir=tmp_path / name) as collector:
            _deliver(collector.port, events)
            answers[name] = [_get_json(collector.url + path) for path in paths]
            # an all-time summary: both sum it from their rollups, and read
            # the same percentiles from the same histogram buckets
            answers[name].append(_get_json(collector.url + f"/api/summary?since={t0 - 1}"))
    compared = zip([*paths, "all time"], answers["postgres"], answers["sqlite"], strict=True)
    for path, pg, sqlite in compared:
        assert pg == sqlite, path
    assert answers["postgres"][0]["calls"] > 0 and answers["postgres"][0]["refused_calls"] > 0
