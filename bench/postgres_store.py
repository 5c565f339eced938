"""PostgreSQL beside SQLite: collector ingest events/s, and reports over a large store.

Starts a throwaway PostgreSQL server (tests/support/postgres.py: Debian's
initdb and pg_ctl in a temporary directory, C{fsync=on}, loopback only) and
measures, for each back end:

1. Ingest through a real collector: C{twistd -n llmobserve-collector --db
   URL-or-FILE}, C{--links} link connections sending C{--events} events in
   batches of C{--batch} with C{--window} unacked (as bench/collector_ingest.py:
   the clock runs from the first byte to the last ack, an ack meaning
   committed), and the store alone in this process (C{insert} in batches).
2. Reports over a large store: C{--rows} events (ts spread over a year, 17
   customers, 6 models) written straight into the store, then the median of
   C{--repeats} runs of each query the HTTP API answers: the report by
   provider and model (all time), by day over the last 30 days, by customer
   for one model, and the first page of events for one customer.
3. With C{--dashboard}: the dashboard's C{/api/summary} and C{/api/timeseries}
   (by provider, C{bucket=auto}) over the last 24 h, 7 d, 30 d and all time
   (a series needs a start: the store's year), as the reader thread runs
   them; on PostgreSQL also the summary read from the events alone (the
   baseline, same run).

Bounded by C{--timeout}; the collector and the server are always stopped.
Prints one line per figure; C{--json} prints them as one JSON map.

    .venv/bin/python -m bench.postgres_store [--events 100000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from bench.collector_ingest import make_event, run_link, start_collector
from llmobserve.collector import Store, open_store
from llmobserve.collector._store import EventStore
from llmobserve.events import encode_frame

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.postgres import PostgresServer, find_binaries  # noqa: E402

_MODELS = ("gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4", "claude-haiku", "gemini-2.5")
_YEAR = 365 * 86400.0


def big_event(i: int, now: float, rng: random.Random) -> dict[str, Any]:
    """An event of the large store: any time in the last year."""
    model = _MODELS[i % len(_MODELS)]
    return {
        "id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "kind": "call",
        "ts": now - rng.random() * _YEAR,
        "duration_ms": 50.0 + (i * 7919) % 5000,
        "status": 200,
        "outcome": "ok",
        "provider": "anthropic" if model.startswith("claude") else "openai",
        "endpoint": "chat.completions",
        "model": model,
        "streamed": bool(i % 2),
        "usage": {"input_tokens": 1000 + i % 97, "output_tokens": 200},
        "cost_usd": None if i % 50 == 0 else 0.0003 + (i % 11) * 1e-5,
        "price_ref": f"unknown model: {model}-{i % 3}" if i % 50 == 0 else None,
        "context": {"customer_id": f"cust-{i % 17}", "run_id": f"run-{i // 100}"},
    }


def _rollup_trigger(store: Store, on: bool) -> None:
    """Turn PostgreSQL's rollup triggers on insert (the report's and the
    summary's) on or off (the baseline)."""
    for trigger in ("events_rollup_add", "events_summary_add"):
        store._change(f"ALTER TABLE events {'ENABLE' if on else 'DISABLE'} TRIGGER {trigger}", ())


def _through_collector(db: str, args: argparse.Namespace, salt: int) -> float:
    """Events/s through a real collector on C{db}."""
    per_link = args.events // args.links
    events = [[make_event(i, salt + p) for i in range(per_link)] for p in range(args.links)]
    frames = [
        [
            (seq, encode_frame({"t": "batch", "seq": seq, "events": evs[k : k + args.batch]}))
            for seq, k in enumerate(range(0, per_link, args.batch))
        ]
        for evs in events
    ]
    total = per_link * args.links
    proc, port = start_collector(db, 60.0)  # type: ignore[arg-type]  # a postgresql:// URL where a path is typed
    try:
        results: list[dict[str, Any]] = [{} for _ in range(args.links)]
        threads = [
            threading.Thread(
                target=run_link,
                args=(port, f"bench-{uuid.uuid4().hex[:6]}", frames[p], args.window, results[p]),
                daemon=True,
            )
            for p in range(args.links)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
        if not all("done" in r for r in results):
            raise SystemExit("a link did not finish")
        return float(total / (max(r["done"] for r in results) - t0))
    finally:
        proc.kill()
        proc.wait()


def ingest(db: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Events/s through a collector on C{db}, and of the store alone; on
    PostgreSQL also without the rollup's trigger (the baseline, same run)."""
    total = args.events // args.links * args.links
    postgres = db.startswith("postgresql://")
    out = {"collector_events_per_s": _through_collector(db, args, 0)}
    if postgres:
        store = open_store(db)
        _rollup_trigger(store, False)
        out["collector_no_rollup_events_per_s"] = _through_collector(db, args, 100)
        _rollup_trigger(store, True)
        store.close()
    # the store alone, fresh events, same batches; on PostgreSQL also
    # without the rollup's triggers, in turns (the baseline, same run)
    store = open_store(db)
    rates: dict[str, list[float]] = {"store_alone_events_per_s": []}
    rounds = [("store_alone_events_per_s", True)]
    if postgres:
        rates["store_alone_no_rollup_events_per_s"] = []
        rounds = [*rounds, ("store_alone_no_rollup_events_per_s", False)] * 2
    for n, (key, rollup) in enumerate(rounds):
        alone = [make_event(i, 200 + n) for i in range(total // len(rounds))]
        if postgres:
            _rollup_trigger(store, rollup)
        t0 = time.perf_counter()
        for k in range(0, len(alone), args.batch):
            store.insert(alone[k : k + args.batch])
        rates[key].append(len(alone) / (time.perf_counter() - t0))
    if postgres:
        _rollup_trigger(store, True)
    store.close()
    return {**out, **{key: statistics.median(found) for key, found in rates.items()}}


def fill(store: Store, rows: int, now: float) -> float:
    """Write C{rows} events of the large store; returns events/s."""
    rng = random.Random(7)
    t0 = time.perf_counter()
    chunk = 20_000
    for k in range(0, rows, chunk):
        store.insert([big_event(i, now, rng) for i in range(k, min(rows, k + chunk))])
    return rows / (time.perf_counter() - t0)


def fill_sql(store: Store, rows: int, now: float) -> float:
    """L{fill} done by the server (PostgreSQL only): the same events, made
    by C{generate_series} in statements of a million rows (the rollup's
    trigger runs once a statement); returns events/s."""
    models = ", ".join(f"'{m}'" for m in _MODELS)
    anthropic = ", ".join(str(i) for i, m in enumerate(_MODELS) if m.startswith("claude"))
    chunk = 1_000_000
    t0 = time.perf_counter()
    for k in range(0, rows, chunk):
        store._change(  # a bulk load, in one statement a chunk
            f"""
            INSERT INTO events (id, kind, ts, duration_ms, status, outcome, provider,
                endpoint, model, streamed, usage, cost_usd, price_ref, context,
                input_tokens, output_tokens, customer_id, run_id)
            SELECT md5(i::text || '-big'), 'call', %s - random() * {_YEAR},
                50.0 + (i * 7919) %% 5000, 200, 'ok',
                CASE WHEN i %% 6 IN ({anthropic}) THEN 'anthropic' ELSE 'openai' END,
                'chat.completions', (ARRAY[{models}])[i %% 6 + 1], i %% 2,
                '{{"input_tokens":' || (1000 + i %% 97) || ',"output_tokens":200}}',
                CASE WHEN i %% 50 <> 0 THEN 0.0003 + (i %% 11) * 1e-5 END,
                CASE WHEN i %% 50 = 0 THEN '"unknown model: '
                    || (ARRAY[{models}])[i %% 6 + 1] || '-' || i %% 3 || '"' END,
                '{{"customer_id":"cust-' || i %% 17 || '","run_id":"run-' || i / 100 || '"}}',
                1000 + i %% 97, 200, 'cust-' || i %% 17, 'run-' || i / 100
            FROM generate_series(%s::bigint, %s::bigint) AS i
            """,
            (now, k, min(rows, k + chunk) - 1),
        )
    return rows / (time.perf_counter() - t0)


def rebuild_rollup(url: str) -> dict[str, float]:
    """Seconds to sum the report's rollup and the summary's tables again
    from every event (what migrations 4 and 5 do to a store that already
    holds events)."""
    import psycopg

    from llmobserve.collector import _pgrollup, _pgsummary

    out: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name, rebuild in (("rollup", _pgrollup.REBUILD), ("summary", _pgsummary.REBUILD)):
            t0 = time.perf_counter()
            conn.execute(rebuild)  # a few statements, one transaction
            out[name] = time.perf_counter() - t0
        conn.execute("VACUUM ANALYZE")
    return out


def report_timings(store: Store, now: float, repeats: int) -> dict[str, float]:
    """Median seconds of each query the API answers, over the large store
    (and, as the baseline, the all-time report summed from the events alone)."""
    queries: dict[str, Callable[[], object]] = {
        "report_by_provider_model_all_time": lambda: store.report(("provider", "model")),
        "report_by_provider_model_all_time_from_events": lambda: Store.report(
            store, ("provider", "model")
        ),
        "report_by_day_last_30d": lambda: store.report(("day",), since=now - 30 * 86400),
        "report_by_customer_one_model": lambda: store.report(("customer",), model="o3"),
        "events_first_page_one_customer": lambda: store.events(limit=100, customer="cust-3"),
    }
    out: dict[str, float] = {}
    for name, query in queries.items():
        query()  # warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            query()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


_WINDOWS = (("24h", 86_400.0), ("7d", 7 * 86_400.0), ("30d", 30 * 86_400.0), ("all", None))


def dashboard_timings(store: Store, now: float, repeats: int) -> dict[str, float]:
    """Median seconds of the dashboard's summary and time series over each
    default window (and all time), as the reader thread runs them; on
    PostgreSQL also the summary summed from the events alone (the baseline,
    one run each: seconds apiece at 10 M events)."""
    from llmobserve.collector import _insights

    def summary(since: float | None, from_events: bool = False) -> Callable[[], object]:
        def query() -> object:
            if not from_events:
                return _insights.summary(store, since, now, {})
            with mock.patch.object(store, "summary_rollup", return_value=None):
                return _insights.summary(store, since, now, {})

        return query

    def series(since: float) -> Callable[[], object]:
        bucket = _insights.auto_bucket(now - since)
        return lambda: _insights.timeseries(store, "provider", bucket, since, now, {})

    queries: dict[str, tuple[Callable[[], object], int]] = {}
    for name, span in _WINDOWS:
        since = None if span is None else now - span
        queries[f"summary_{name}"] = (summary(since), repeats)
        if not isinstance(store, EventStore):
            queries[f"summary_{name}_from_events"] = (summary(since, True), 1)
        queries[f"timeseries_{name}"] = (series(now - (span or _YEAR + 86_400.0)), repeats)
    out: dict[str, float] = {}
    for name, (query, runs) in queries.items():
        query()  # warm
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            query()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--links", type=int, default=2)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument(
        "--fill-sql",
        action="store_true",
        help="PostgreSQL makes the large store itself (generate_series): 10 M rows in minutes",
    )
    ap.add_argument("--backends", default="sqlite,postgres", help="comma-separated")
    ap.add_argument(
        "--dashboard", action="store_true", help="time /api/summary and /api/timeseries too"
    )
    ap.add_argument("--skip-rebuild", action="store_true", help="do not time migration 4's rebuild")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    bindir = find_binaries()
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries: apt-get install postgresql")
    tmp = Path(tempfile.mkdtemp(prefix="llmo-pgbench-"))
    server = PostgresServer(bindir, fsync=True)

    def give_up() -> None:
        server.destroy()
        print("postgres bench: timed out", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    answer: dict[str, Any] = {"events": args.events, "rows": args.rows}
    try:
        server.init().start()
        subprocess.run(
            [
                str(bindir / "psql"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                "llmobserve",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE ingest",
                "-c",
                "CREATE DATABASE big",
            ],
            check=True,
            capture_output=True,
        )
        backends = {
            "sqlite": (str(tmp / "ingest.sqlite3"), str(tmp / "big.sqlite3")),
            "postgres": (server.url("ingest"), server.url("big")),
        }
        now = time.time()
        chosen = args.backends.split(",")
        for name, (ingest_db, big_db) in backends.items():
            if name not in chosen:
                continue
            if not args.skip_ingest:
                for key, value in ingest(ingest_db, args, tmp).items():
                    answer[f"{name}_{key}"] = round(value)
                    print(f"{name}: {key.replace('_', ' ')}: {value:,.0f}", flush=True)
            store = open_store(big_db)
            if args.fill_sql and name == "postgres":
                rate = fill_sql(store, args.rows, now)
            else:
                rate = fill(store, args.rows, now)
            answer[f"{name}_fill_events_per_s"] = round(rate)
            print(f"{name}: filled {args.rows:,} events at {rate:,.0f}/s", flush=True)
            if name == "postgres":
                store._change("ANALYZE", ())  # the events and the rollups, as autovacuum would soon
                ((hours,),) = store.read("SELECT count(*) FROM rollup_hourly")
                answer["postgres_rollup_rows"] = hours
                print(f"{name}: rollup rows: {hours:,}", flush=True)
                for table in ("rollup_latency_hourly", "rollup_latency_daily"):
                    ((found,),) = store.read(f"SELECT count(*) FROM {table}")
                    answer[f"postgres_{table}_rows"] = found
                    print(f"{name}: {table} rows: {found:,}", flush=True)
                if not args.skip_rebuild:
                    for table, seconds in rebuild_rollup(big_db).items():
                        answer[f"postgres_{table}_rebuild_s"] = round(seconds, 1)
                        print(f"{name}: {table} summed again from the events: {seconds:.1f} s")
            timings = report_timings(store, now, args.repeats)
            if args.dashboard:
                timings.update(dashboard_timings(store, now, args.repeats))
            for key, seconds in timings.items():
                answer[f"{name}_{key}_s"] = round(seconds, 3)
                print(f"{name}: {key.replace('_', ' ')}: {seconds:.3f} s", flush=True)
            store.close()
        if args.json:
            print(json.dumps(answer))
    finally:
        watchdog.cancel()
        server.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
