"""What the dashboard asks of a store beyond L{EventStore.report}: a window's
summary, cost and calls over time, one event, one run.

Plain functions of an L{EventStore}, run in the reader thread like every
other query. Only C{call} events count as calls (spans and gaps are not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from ._store import EventStore, StoreError

__all__ = [
    "MAX_BUCKETS",
    "RUN_LIMIT",
    "SERIES",
    "auto_bucket",
    "event_by_id",
    "run",
    "summary",
    "timeseries",
]

#: What a time series may be split by, and the column each names.
SERIES: Final[dict[str, str]] = {"provider": "provider", "model": "model"}
#: The most buckets one series answer holds.
MAX_BUCKETS: Final = 2000
#: The most series one answer holds; the rest are summed as C{"other"}.
TOP_SERIES: Final = 8
#: The most events one run answer holds.
RUN_LIMIT: Final = 5000
#: The most unknown-cost reasons a summary lists.
TOP_REASONS: Final = 5

#: Bucket sizes C{auto} picks from, smallest first: about 24 to 96 bars.
_AUTO_STEPS: Final = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86_400, 7 * 86_400)


def _money(value: Any) -> float | None:
    # sums of many small floats carry noise in the last digits; a sum past
    # the float range has no JSON spelling: unknown
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 10)


def _percentile(store: EventStore, where: str, params: list[Any], n: int, q: float) -> Any:
    """The C{q} quantile of C{duration_ms} (nearest rank) among C{n} calls."""
    if n == 0:
        return None
    rank = max(0, math.ceil(q * n) - 1)
    rows = store.read(
        f"SELECT duration_ms FROM events{where} AND duration_ms IS NOT NULL "
        "ORDER BY duration_ms LIMIT 1 OFFSET ?",
        [*params, rank],
    )
    return rows[0][0] if rows else None


def summary(
    store: EventStore,
    since: float | None,
    until: float | None,
    filters: Mapping[str, str | None],
) -> dict[str, Any]:
    """Totals of the calls in a window: cost, calls, tokens, errors, the
    share whose cost is unknown (with the commonest reasons) and upstream
    latency percentiles (C{duration_ms}, nearest rank).

    An error is a call whose C{outcome} is not C{ok} or whose C{status} is
    400 or more.
    """
    where, params = store.where({**filters, "kind": "call"}, since, until)
    ((calls, cost, unpriced, tokens_in, tokens_out, errors, timed),) = store.read(
        "SELECT count(*), sum(cost_usd), sum(cost_usd IS NULL), sum(input_tokens),"
        " sum(output_tokens), sum(coalesce(outcome, 'ok') != 'ok' OR coalesce(status, 0) >= 400),"
        f" count(duration_ms) FROM events{where}",
        params,
    )
    reasons = store.read(
        f"SELECT price_ref, count(*) AS n FROM events{where} AND cost_usd IS NULL "
        "GROUP BY price_ref ORDER BY n DESC, price_ref LIMIT ?",
        [*params, TOP_REASONS],
    )
    unpriced = unpriced or 0
    errors = errors or 0
    return {
        "since": since,
        "until": until,
        "calls": calls,
        "cost_usd": _money(cost),
        "input_tokens": tokens_in or 0,
        "output_tokens": tokens_out or 0,
        "errors": errors,
        "error_rate": errors / calls if calls else None,
        "unpriced_calls": unpriced,
        "unpriced_share": unpriced / calls if calls else None,
        "unpriced_reasons": [{"reason": _reason(text), "calls": n} for text, n in reasons if n],
        "latency_ms": {
            "p50": _percentile(store, where, params, timed, 0.50),
            "p95": _percentile(store, where, params, timed, 0.95),
        },
    }


def _reason(price_ref: Any) -> str | None:
    """A stored C{price_ref} (JSON text, usually a string) as a reason."""
    if price_ref is None:
        return None
    text = str(price_ref)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"')
    return text


def auto_bucket(span: float) -> int:
    """The bucket size (seconds) C{bucket=auto} gives a window C{span} long:
    the smallest step that keeps the series at 96 bars or fewer."""
    for step in _AUTO_STEPS:
        if span / step <= 96:
            return step
    return max(_AUTO_STEPS[-1], math.ceil(span / MAX_BUCKETS))


def timeseries(
    store: EventStore,
    by: str,
    bucket: int,
    since: float,
    until: float,
    filters: Mapping[str, str | None],
) -> dict[str, Any]:
    """Cost and calls per bucket of C{bucket} seconds from C{since} to
    C{until}, one series for each value of C{by} (the costliest
    L{TOP_SERIES}; the others summed as C{"other"}).

    Bucket C{i} starts at C{since + i * bucket}; every bucket is listed,
    empty ones with zeros, so a chart needs no gap filling.

    @raise StoreError: C{by} is not one of L{SERIES}, or too many buckets.
    """
    column = SERIES.get(by)
    if column is None:
        raise StoreError(f"unknown series {by!r}; known: {', '.join(SERIES)}")
    count = max(1, math.ceil((until - since) / bucket))
    if count > MAX_BUCKETS:
        raise StoreError(f"{count} buckets of {bucket} s: at most {MAX_BUCKETS}; pick a larger one")
    where, params = store.where({**filters, "kind": "call"}, since, until)
    rows = store.read(
        f"SELECT CAST((ts - ?) / ? AS INTEGER) AS b, {column}, count(*), sum(cost_usd)"
        f" FROM events{where} GROUP BY b, {column}",
        [since, bucket, *params],
    )
    totals: dict[Any, float] = {}
    for _, key, calls, cost in rows:
        totals[key] = totals.get(key, 0.0) + (cost or 0.0) + calls * 1e-12
    ranked = sorted(totals, key=lambda k: (-totals[k], str(k)))
    kept = set(ranked[:TOP_SERIES])
    names = [_series_name(k) for k in ranked[:TOP_SERIES]]
    if len(ranked) > TOP_SERIES:
        names.append("other")
    index = {name: i for i, name in enumerate(names)}
    cost_rows = [[0.0] * count for _ in names]
    call_rows = [[0] * count for _ in names]
    for b, key, calls, cost in rows:
        if not 0 <= b < count:
            continue
        i = index[_series_name(key) if key in kept else "other"]
        call_rows[i][b] += calls
        cost_rows[i][b] += cost or 0.0
    return {
        "by": by,
        "bucket": bucket,
        "since": since,
        "until": until,
        "starts": [since + i * bucket for i in range(count)],
        "series": [
            {
                "name": name,
                "cost_usd": [_money(c) or 0.0 for c in cost_rows[i]],
                "calls": call_rows[i],
            }
            for i, name in enumerate(names)
        ],
    }


def _series_name(key: Any) -> str:
    return "(none)" if key is None else str(key)


def event_by_id(store: EventStore, event_id: str) -> dict[str, Any] | None:
    """The stored event with this C{id}, or None."""
    return store.event(event_id)


def run(store: EventStore, run_id: str) -> dict[str, Any]:
    """A run's events (calls and spans) in time order, with its calls'
    total cost, first and last time. At most L{RUN_LIMIT} events are listed
    (C{truncated} says so); the totals count them all."""
    events = store.events(limit=RUN_LIMIT + 1, run=run_id)
    where, params = store.where({"run": run_id, "kind": "call"}, None, None)
    ((calls, cost, unpriced),) = store.read(
        f"SELECT count(*), sum(cost_usd), sum(cost_usd IS NULL) FROM events{where}", params
    )
    ((first, last),) = store.read(
        "SELECT min(ts), max(ts + coalesce(duration_ms, 0) / 1000.0) FROM events WHERE run_id = ?",
        [run_id],
    )
    return {
        "run_id": run_id,
        "calls": calls,
        "cost_usd": _money(cost),
        "unpriced_calls": unpriced or 0,
        "start": first,
        "end": last,
        "events": events[:RUN_LIMIT],
        "truncated": len(events) > RUN_LIMIT,
    }
