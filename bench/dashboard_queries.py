"""Dashboard query times on a store of 1,000,000 realistic events.

Fills a fresh store (or reuses C{--db} if it already holds C{--events}
events) with calls spread over the last 30 days: 5 providers, 14 models,
300 customers, 20 tenants, nested section paths, runs of about 20 calls
with their spans, lognormal latencies, 3 % errors, 2 % of unknown cost.
Then builds the rollup as the reader does after a start (in steps) and
times every request the dashboard makes, in this process, exactly as
the collector's reader thread runs it (the resource's query, then the JSON
encoding of the answer), C{--repeats} times each, and prints the median and
the worst per endpoint, then one answer line: the slowest median.

    .venv/bin/python -m bench.dashboard_queries [--events 1000000] [--db PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import resource as rusage
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.web.test.requesthelper import DummyRequest

from llmobserve.collector._http import (
    EventsResource,
    ReportResource,
    RunsResource,
    SummaryResource,
    TimeseriesResource,
)
from llmobserve.collector._insights import warm_up
from llmobserve.collector._store import EventStore

PROVIDERS = {
    "openai": ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"],
    "anthropic": ["claude-sonnet-4", "claude-haiku-3.5", "claude-opus-4"],
    "google": ["gemini-2.0-flash", "gemini-1.5-pro"],
    "mistral": ["mistral-large", "mistral-small"],
    "pinecone": ["query", "upsert", "fetch"],
}
SECTIONS = [
    "agent:researcher",
    "agent:researcher/tool:web_search",
    "agent:researcher/tool:summarize",
    "agent:writer",
    "agent:writer/step:draft",
    "agent:writer/step:edit",
    "agent:planner",
    "agent:planner/tool:calendar",
    "batch:nightly",
    "batch:nightly/embed",
]
DAY = 86_400.0


def _events(n: int, now: float, seed: int = 17) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    providers = list(PROVIDERS)
    start = now - 30 * DAY
    run = 0
    for i in range(n):
        if i % 20 == 0:
            run += 1
        ts = start + (i / n) * 30 * DAY + rng.random()
        provider = rng.choices(providers, weights=[50, 30, 10, 6, 4])[0]
        model = rng.choice(PROVIDERS[provider])
        error = rng.random() < 0.03
        priced = rng.random() >= 0.02
        section = rng.choice(SECTIONS)
        tokens_in, tokens_out = rng.randint(50, 8000), rng.randint(1, 1500)
        context = {
            "run_id": f"run-{run}",
            "span_id": f"s{i}",
            "section": section.rsplit("/", 1)[-1],
            "section_path": section,
            "customer_id": f"customer-{int(rng.paretovariate(1.2)) % 300}",
            "tenant_id": f"tenant-{rng.randrange(20)}",
        }
        yield {
            "id": f"ev-{i:08d}",
            "kind": "call",
            "ts": ts,
            "duration_ms": rng.lognormvariate(6.5, 0.8),
            "ttfb_ms": rng.lognormvariate(5.5, 0.6),
            "overhead_ms": 0.08,
            "method": "POST",
            "host": f"api.{provider}.example",
            "path": "/v1/chat/completions",
            "status": 529 if error else 200,
            "outcome": "upstream_error" if error else "ok",
            "provider": provider,
            "endpoint": "chat.completions",
            "model": model,
            "streamed": rng.random() < 0.4,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
            "usage_source": "reported",
            "cost_usd": (tokens_in * 2.5e-6 + tokens_out * 1e-5) if priced else None,
            "price_ref": f"genai-prices:{provider}/{model}"
            if priced
            else f"unknown model: {model}",
            "request_bytes": 900,
            "response_bytes": 1400,
            "context": context,
            "flags": [],
        }
        if i % 20 == 0:
            yield {
                "id": f"span-{run}",
                "kind": "span",
                "ts": ts,
                "run_id": f"run-{run}",
                "span_id": f"root-{run}",
                "name": section,
            }


def fill(store: EventStore, n: int, now: float) -> float:
    """Insert C{n} calls (and their runs' spans) in batches; seconds taken."""
    t0 = time.perf_counter()
    batch: list[dict[str, Any]] = []
    for event in _events(n, now):
        batch.append(event)
        if len(batch) == 10_000:
            store.insert(batch)
            batch = []
    if batch:
        store.insert(batch)
    return time.perf_counter() - t0


def _job(resource: Any, path: list[bytes], args: dict[str, str]) -> Callable[[EventStore], Any]:
    request = DummyRequest(path)
    request.args = {k.encode(): [v.encode()] for k, v in args.items()}
    job: Callable[[EventStore], Any] = resource.query(request)
    return job


def requests(now: float) -> list[tuple[str, Any, list[bytes], dict[str, str]]]:
    """The requests the dashboard makes: overview, breakdowns, calls, detail, run."""
    out: list[tuple[str, Any, list[bytes], dict[str, str]]] = []
    for window in ("1h", "24h", "7d", "30d"):
        out.append((f"summary since={window}", SummaryResource, [], {"since": window}))
        out.append(
            (f"timeseries by=provider since={window}", TimeseriesResource, [], {"since": window})
        )
    out.append(
        ("timeseries by=model since=30d", TimeseriesResource, [], {"since": "30d", "by": "model"})
    )
    for group in ("customer", "tenant", "section_path", "model", "provider", "endpoint"):
        for window in ("24h", "30d"):
            out.append(
                (
                    f"report by={group} since={window}",
                    ReportResource,
                    [],
                    {"by": group, "since": window},
                )
            )
    calls = {"kind": "call", "order": "desc", "limit": "50"}
    out.append(("events calls since=24h", EventsResource, [], {**calls, "since": "24h"}))
    out.append(("events calls since=30d", EventsResource, [], {**calls, "since": "30d"}))
    out.append(
        (
            "events calls since=30d offset=5000",
            EventsResource,
            [],
            {**calls, "since": "30d", "offset": "5000"},
        )
    )
    out.append(
        (
            "events calls customer since=30d",
            EventsResource,
            [],
            {**calls, "since": "30d", "customer": "customer-7"},
        )
    )
    out.append(
        (
            "events calls model since=24h",
            EventsResource,
            [],
            {**calls, "since": "24h", "model": "gpt-4o"},
        )
    )
    out.append(("events/ID", EventsResource, [b"ev-00500000"], {}))
    out.append(("runs/ID", RunsResource, [b"run-25000"], {}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", help="store file (reused when it holds the events already)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="llmo-dash-")) / "events.db"
    store = EventStore(path, synchronous="OFF")
    now = time.time()
    filled = None
    if store.count() < args.events:
        filled = fill(store, args.events - store.count(), now)
    else:
        (latest,) = store.read("SELECT max(ts) FROM events")[0]
        now = float(latest)
    store.close()
    store = EventStore(path)  # reopened as the collector's reader opens it
    rss0 = rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    while not warm_up(store):  # the reader's warm-up after a start, step by step
        pass
    built = time.perf_counter() - t0
    grown = (rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if not args.json:
        print(
            f"{'rollup built (warm-up after a start)':42s} {built * 1000:8.1f} ms,"
            f" peak RSS +{grown:.0f} MiB"
        )
    results: dict[str, dict[str, float]] = {}
    for name, kind, path_parts, params in requests(now):
        resource = kind(None)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            answer = _job(resource, path_parts, params)(store)
            json.dumps(answer, separators=(",", ":"), allow_nan=False)
            times.append((time.perf_counter() - t0) * 1000)
        results[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
        if not args.json:
            print(f"{name:42s} median {statistics.median(times):8.1f} ms  max {max(times):8.1f} ms")
    slowest = max(results, key=lambda k: results[k]["median_ms"])
    answer = (
        f"dashboard queries on {store.count():,} events: slowest median "
        f"{results[slowest]['median_ms']:.1f} ms ({slowest}); "
        f"{sum(r['median_ms'] < 200 for r in results.values())}/{len(results)} under 200 ms"
        + f"; rollup built in {built:.1f} s"
        + (f"; filled in {filled:.0f} s" if filled is not None else "")
    )
    store.close()
    if args.json:
        print(json.dumps({"answer": answer, "results": results}))
    else:
        print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
