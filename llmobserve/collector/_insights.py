"""What the dashboard asks of a store beyond L{Store.report}: a window's
summary, cost and calls over time, one event, one run.

Plain functions of a L{Store} of either back end, run in the reader thread
like every other query, in SQL both run: placeholders, cost sums and text
order come from the store's dialect hooks (L{Store.placeholder},
L{Store.cost_sum}, L{Store.text_order}). Only C{call} events count as calls
(spans and gaps are not). The in-memory L{Rollup} is SQLite's (it follows
C{rowid}); PostgreSQL keeps its own tables (L{Store.report} and
L{Store.summary_rollup} read them).
"""

from __future__ import annotations

import calendar
import math
import time
import weakref
from collections.abc import Mapping
from typing import Any, Final

from ._rollup import (
    DAILY,
    DAY,
    HISTOGRAM_SCALE,
    HOUR,
    HOURLY,
    NOT_FORWARDED_SQL,
    ONLY,
    TOKENS,
    CallSums,
    Rollup,
    sums_sql,
)
from ._store import EventStore, Store, StoreError

__all__ = [
    "MAX_BUCKETS",
    "RUN_LIMIT",
    "SERIES",
    "auto_bucket",
    "event_by_id",
    "report",
    "rollup_for",
    "run",
    "summary",
    "timeseries",
    "warm_up",
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


#: Each store's rollup (a store belongs to one thread: so does its rollup).
_ROLLUPS: weakref.WeakKeyDictionary[EventStore, Rollup] = weakref.WeakKeyDictionary()
#: A window shorter than this many whole units of its sums reads the events.
_MIN_UNITS: Final = 3
_FAR: Final = 2**64  # past any unit CAST(... AS INTEGER) can give


#: Rows a query adds to the rollup at most before it answers (about 0.2 s
#: here): more, and it reads the events instead while L{warm_up} catches up.
REFRESH_STEP: Final = 20_000


def rollup_for(store: EventStore, limit: int | None = None) -> Rollup:
    """C{store}'s rollup, brought up to date (by at most C{limit} rows)."""
    found = _ROLLUPS.get(store)
    if found is None:
        found = _ROLLUPS[store] = Rollup()
    found.refresh(store, limit)
    return found


def warm_up(any_store: Store) -> bool:
    """Add one step of rows to C{store}'s rollup; whether it is caught up.

    Run as a job of the reader thread, again and again while this is False
    (L{llmobserve.collector._http.start_warm_up}): a store of a million
    events is summed in steps of about 0.2 s, and the queries that arrive
    meanwhile run between them.
    """
    if not isinstance(any_store, EventStore):
        return True  # another back end keeps no rollup here: nothing to warm
    store = any_store
    return rollup_for(store, REFRESH_STEP).caught_up


def _plan(
    store: Store,
    dim: str,
    since: float | None,
    until: float | None,
    filters: Mapping[str, str | None],
) -> tuple[Rollup, int, int, list[tuple[float | None, float | None]]] | None:
    """How to answer an unfiltered window question about C{dim} from the
    rollup: the rollup, its whole units C{[first, last)}, and the ragged
    edges (time ranges) to read from the events. None: read the events."""
    if not isinstance(store, EventStore):
        return None  # no rollup but SQLite's: read the events
    if any(v is not None for v in filters.values()):
        return None
    if not (dim in HOURLY or dim in DAILY):
        return None
    rollup = rollup_for(store, REFRESH_STEP)
    if not rollup.caught_up or not rollup.covers(dim):
        return None
    size = HOUR if dim in HOURLY else 86_400
    first = -_FAR if since is None else math.ceil(since / size)
    last = _FAR if until is None else math.floor(until / size)
    if last - first < _MIN_UNITS:
        return None
    edges: list[tuple[float | None, float | None]] = []
    if since is not None and since < first * size:
        edges.append((since, float(first * size)))
    if until is not None and last * size < until:
        edges.append((float(last * size), until))
    return rollup, first, last, edges


def _edge_where(store: Store, edge: tuple[float | None, float | None]) -> tuple[str, list[Any]]:
    p = store.placeholder
    return f" WHERE kind = 'call' AND ts >= {p} AND ts < {p}", [edge[0], edge[1]]


def _grouped_edges(
    store: Store, column: str, edges: list[tuple[float | None, float | None]], only: str = ""
) -> dict[Any, CallSums]:
    out: dict[Any, CallSums] = {}
    for edge in edges:
        where, params = _edge_where(store, edge)
        for value, *row in store.read(
            f"SELECT {column}, {sums_sql(store.cost_sum)} FROM events{where}{only} GROUP BY 1",
            params,
        ):
            into = out.get(value)
            if into is None:
                into = out[value] = CallSums()
            into.add_row(row)
    return out


def _money(value: Any) -> float | None:
    # sums of many small floats carry noise in the last digits; a sum past
    # the float range has no JSON spelling: unknown (PostgreSQL's numeric
    # sum is finite there, its float is not)
    if value is None:
        return None
    value = float(value)
    return round(value, 10) if math.isfinite(value) else None


def _percentile(store: Store, where: str, params: list[Any], n: int, q: float) -> Any:
    """The C{q} quantile of C{duration_ms} (nearest rank) among C{n} calls."""
    if n == 0:
        return None
    rank = max(0, math.ceil(q * n) - 1)
    rows = store.read(
        f"SELECT duration_ms FROM events{where} AND duration_ms IS NOT NULL "
        f"ORDER BY duration_ms LIMIT 1 OFFSET {store.placeholder}",
        [*params, rank],
    )
    return rows[0][0] if rows else None


def summary(
    any_store: Store,
    since: float | None,
    until: float | None,
    filters: Mapping[str, str | None],
) -> dict[str, Any]:
    """Totals of the calls in a window: cost, calls, tokens, errors, the
    share whose cost is unknown (with the commonest reasons) and upstream
    latency percentiles (C{duration_ms}, nearest rank).

    An error is a call whose C{outcome} is not C{ok} or whose C{status} is
    400 or more. An unfiltered window of three hours or more is summed from
    the rollup (SQLite's in memory, PostgreSQL's tables: exact) and its
    percentiles read from its latency histogram (within 2.5 %); any other
    reads the events (exact).
    """
    store = any_store
    where, params = store.where({**filters, "kind": "call"}, since, until)
    plan = _plan(store, "", since, until, filters)
    kept = None
    if plan is None and not any(v is not None for v in filters.values()):
        kept = store.summary_rollup(since, until, TOP_REASONS)
    latency: dict[str, Any]
    reasons: list[tuple[Any, int]] | None = None
    if kept is not None:
        total_row, histogram, reasons = kept
        total = CallSums()
        total.add_row(list(total_row))
        latency = {"p50": _from_histogram(histogram, 0.50), "p95": _from_histogram(histogram, 0.95)}
    elif plan is None:
        ((total_row),) = store.read(
            f"SELECT {sums_sql(store.cost_sum)}, count(duration_ms) FROM events{where}", params
        )
        total = CallSums()
        total.add_row(total_row[:-1])
        timed = total_row[-1]
        latency = {
            "p50": _percentile(store, where, params, timed, 0.50),
            "p95": _percentile(store, where, params, timed, 0.95),
        }
    else:
        rollup, first, last, edges = plan
        total = rollup.sums("", first, last).get(None) or CallSums()
        for edge_sums in _grouped_edges(store, "NULL", edges).values():
            total.add(edge_sums)
        histogram = rollup.latency(first, last)
        for edge in edges:
            edge_where, edge_params = _edge_where(store, edge)
            for bucket, calls in store.read(
                f"SELECT CAST(floor(ln(duration_ms) * {HISTOGRAM_SCALE}) AS INTEGER), count(*)"
                f" FROM events{edge_where} AND duration_ms > 0 GROUP BY 1",
                edge_params,
            ):
                histogram[bucket] = histogram.get(bucket, 0) + calls
        latency = {"p50": _from_histogram(histogram, 0.50), "p95": _from_histogram(histogram, 0.95)}
    if reasons is None:
        reasons = _reasons(store, since, until, filters, where, params)
    # as the report: the calls the proxy answered itself (refused, its own
    # errors) are not calls of any provider; they are counted apart
    left_out = filters.get("outcome") is None
    refused = total.not_forwarded if left_out else 0
    calls = total.calls - refused
    errors = total.errors - refused
    unpriced = total.unpriced - (total.not_forwarded_unpriced if left_out else 0)
    return {
        "since": since,
        "until": until,
        "calls": calls,
        "refused_calls": refused,
        "cost_usd": _money(total.cost),
        "estimated_cost_usd": _money(total.estimated_cost),
        "estimated_calls": total.estimated,
        "input_tokens": total.tokens[TOKENS.index("input_tokens")],
        "output_tokens": total.tokens[TOKENS.index("output_tokens")],
        "errors": errors,
        "error_rate": errors / calls if calls else None,
        "unpriced_calls": unpriced,
        "unpriced_share": unpriced / calls if calls else None,
        "unpriced_reasons": [{"reason": _reason(text), "calls": n} for text, n in reasons if n],
        "latency_ms": latency,
    }


def _reasons(
    store: Store,
    since: float | None,
    until: float | None,
    filters: Mapping[str, str | None],
    where: str,
    params: list[Any],
) -> list[tuple[Any, int]]:
    """The commonest C{price_ref} texts of calls without a price, with counts.

    As in L{summary}'s C{unpriced_calls}, calls the proxy did not forward
    are left out unless an C{outcome} filter asks for them.
    """
    left_out = filters.get("outcome") is None
    plan = _plan(store, "reason", since, until, filters)
    if plan is None:
        forwarded = f" AND NOT {NOT_FORWARDED_SQL}" if left_out else ""
        return store.read(
            f"SELECT price_ref, count(*) AS n FROM events{where} AND cost_usd IS NULL"
            f"{forwarded} GROUP BY price_ref"
            f" ORDER BY n DESC, {store.text_order('price_ref')} LIMIT {store.placeholder}",
            [*params, TOP_REASONS],
        )
    rollup, first, last, edges = plan
    counts: dict[Any, int] = {}
    for sums in (
        rollup.sums("reason", first, last),
        _grouped_edges(store, "price_ref", edges, ONLY["reason"]),
    ):
        for text, found in sums.items():
            n = found.calls - (found.not_forwarded if left_out else 0)
            counts[text] = counts.get(text, 0) + n
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] is not None, str(kv[0])))
    return ranked[:TOP_REASONS]


def _from_histogram(histogram: Mapping[int, int], q: float) -> float | None:
    """The C{q} quantile (nearest rank) of a latency histogram, as its
    bucket's geometric middle."""
    n = sum(histogram.values())
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(math.exp((bucket + 0.5) / HISTOGRAM_SCALE), 3)
    return None  # pragma: no cover  (seen reaches n)


def report(
    any_store: Store,
    by: list[str],
    since: float | None,
    until: float | None,
    filters: Mapping[str, str | None],
) -> list[dict[str, Any]]:
    """L{EventStore.report}, from the rollup when it can answer (one
    grouping it keeps, no filter, a long window): the same rows, in the
    same order. Another back end's own report, as it is."""
    if not isinstance(any_store, EventStore):
        return any_store.report(by, since=since, until=until, **filters)
    store = any_store
    dim = by[0] if len(by) == 1 else None
    plan = None if dim is None else _plan(store, dim, since, until, filters)
    if plan is None or dim is None:
        return store.report(by, since=since, until=until, **filters)
    rollup, first, last, edges = plan
    sums = rollup.sums(dim, first, last)
    for value, edge_sums in _grouped_edges(store, store.group_sql(dim), edges).items():
        into = sums.get(value)
        if into is None:
            into = sums[value] = CallSums()
        into.add(edge_sums)
    rows = []
    for value, found in sums.items():
        # as the store's report: calls the proxy answered itself are left out
        calls = found.calls - found.not_forwarded
        if not calls:
            continue
        row: dict[str, Any] = {dim: value, "calls": calls, "cost_usd": _money(found.cost)}
        row["unpriced_calls"] = found.unpriced - found.not_forwarded_unpriced
        row.update(zip(TOKENS, found.tokens, strict=True))
        row["estimated_cost_usd"] = _money(found.estimated_cost)
        row["estimated_calls"] = found.estimated
        rows.append(row)
    # the store's order: costliest first, then most calls, then the key (NULL first)
    rows.sort(key=lambda r: (r[dim] is not None, r[dim] if r[dim] is not None else ""))
    rows.sort(key=lambda r: (-(r["cost_usd"] or 0.0), -r["calls"]))
    return rows


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
    any_store: Store,
    by: str,
    bucket: int,
    since: float,
    until: float,
    filters: Mapping[str, str | None],
) -> dict[str, Any]:
    """Cost and calls per bucket of C{bucket} seconds from C{since} to
    C{until}, one series for each value of C{by} (the costliest
    L{TOP_SERIES}; the others summed as C{"other"}).

    Buckets are aligned to whole multiples of their size (UTC: a C{1d}
    bucket is a UTC day), so the first and the last may be partial; every
    bucket is listed, empty ones with zeros, so a chart needs no gap filling.
    Unfiltered series of whole-hour buckets come from the rollup (on
    PostgreSQL filtered ones too, by any of its dimensions; whole-day
    buckets from its daily table).

    @raise StoreError: C{by} is not one of L{SERIES}, or too many buckets.
    """
    store = any_store
    column = SERIES.get(by)
    if column is None:
        raise StoreError(f"unknown series {by!r}; known: {', '.join(SERIES)}")
    origin = math.floor(since / bucket) * bucket
    count = max(1, math.ceil((until - origin) / bucket))
    if count > MAX_BUCKETS:
        raise StoreError(f"{count} buckets of {bucket} s: at most {MAX_BUCKETS}; pick a larger one")
    plan = _plan(store, by, since, until, filters) if bucket % HOUR == 0 else None
    rows: list[tuple[Any, ...]] = []
    ranges: list[tuple[float | None, float | None]]
    unit = "day" if bucket % DAY == 0 else "hour"
    if plan is None and bucket % HOUR == 0 and store.rollup_answers((unit, by), filters):
        # the store's report per hour reads its own rollup (PostgreSQL's);
        # per day when the buckets are whole days: its daily table, 24 times fewer rows
        ranges = []
        for row in store.report((unit, by), since=since, until=until, **filters):
            if row[unit] is not None:
                start = calendar.timegm(time.strptime(row[unit], _UNIT_FORMAT[unit]))
                rows.append(((start - origin) // bucket, row[by], row["calls"], row["cost_usd"]))
    elif plan is None:
        ranges = [(since, until)]
    else:
        rollup, first, last, ranges = plan
        for (hour, key), found in rollup.series(by, first, last).items():
            forwarded = found.calls - found.not_forwarded
            rows.append(((hour * HOUR - origin) // bucket, key, forwarded, found.cost))
    p = store.placeholder
    for low, high in ranges:
        where, params = store.where({**filters, "kind": "call"}, low, high)
        if filters.get("outcome") is None:  # as the report: only calls that went upstream
            where += f" AND NOT {NOT_FORWARDED_SQL}"
        # floor: a cast to integer truncates in SQLite but rounds in PostgreSQL
        for b, key, calls, cost in store.read(
            f"SELECT CAST(floor((ts - {p}) / {p}) AS bigint) AS b, {column}, count(*),"
            f" {store.cost_sum()} FROM events{where} GROUP BY b, {column}",
            [float(origin), float(bucket), *params],
        ):
            rows.append((int(b), key, int(calls), None if cost is None else float(cost)))
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
        "starts": [origin + i * bucket for i in range(count)],
        "series": [
            {
                "name": name,
                "cost_usd": [_money(c) or 0.0 for c in cost_rows[i]],
                "calls": call_rows[i],
            }
            for i, name in enumerate(names)
        ],
    }


#: How the store's report spells a C{day} and an C{hour} (UTC).
_UNIT_FORMAT: Final = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H:00Z"}


def _series_name(key: Any) -> str:
    return "(none)" if key is None else str(key)


def event_by_id(any_store: Store, event_id: str) -> dict[str, Any] | None:
    """The stored event with this C{id}, or None."""
    return any_store.event(event_id)


def run(any_store: Store, run_id: str) -> dict[str, Any]:
    """A run's events (calls and spans) in time order, with its calls'
    total cost, first and last time. At most L{RUN_LIMIT} events are listed
    (C{truncated} says so); the totals count them all."""
    store = any_store
    events = store.events(limit=RUN_LIMIT + 1, run=run_id)
    where, params = store.where({"run": run_id, "kind": "call"}, None, None)
    ((calls, cost, unpriced),) = store.read(
        f"SELECT count(*), {store.cost_sum()},"
        f" sum(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END) FROM events{where}",
        params,
    )
    ((first, last),) = store.read(
        "SELECT min(ts), max(ts + coalesce(duration_ms, 0) / 1000.0) FROM events"
        f" WHERE run_id = {store.placeholder}",
        [run_id],
    )
    return {
        "run_id": run_id,
        "calls": int(calls),
        "cost_usd": _money(cost),
        "unpriced_calls": int(unpriced or 0),
        "start": first,
        "end": last,
        "events": events[:RUN_LIMIT],
        "truncated": len(events) > RUN_LIMIT,
    }
