"""PostgreSQL's sums for the dashboard's summary: a latency histogram, the
errors and the reasons calls have no price, per hour and per day, kept by
the database in the same transaction as every insert and delete.

L{_pgrollup}'s tables hold a report's sums; C{/api/summary} needs three
more things, which this module's tables (migration 5) keep:

- C{rollup_latency_hourly} and C{rollup_latency_daily}: the C{call}
  events per hour (day), latency bucket and whether the call is an error.
  The buckets are SQLite's (L{HISTOGRAM_SCALE} per factor of e of
  C{duration_ms}: about 5 % wide), so a percentile read from them is
  within 2.5 % and the same as SQLite's; calls without a positive, finite
  C{duration_ms} are in bucket L{NO_BUCKET} (counted for the errors only).
- C{rollup_unpriced_hourly} and C{rollup_unpriced_daily}: the calls
  without a price that went upstream, per hour (day) and C{price_ref}.

Statement-level triggers add the rows an insert really inserted and
subtract those a delete removed, as L{_pgrollup}'s do, each table's rows
in key order. L{summary_parts} answers an unfiltered window of three whole
hours or more from the whole days and hours inside it, plus the events of
its ragged edges, in L{CallSums<llmobserve.collector._rollup.CallSums>}'s
terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ._pgrollup import (
    _HOUR_OF,
    _IN_RANGE,
    _NOT_FORWARDED,
    _TABLES,
    rollup_window,
    window_edges,
)
from ._rollup import ERROR_SQL, HISTOGRAM_SCALE, TOKENS

__all__ = ["MIGRATION", "NO_BUCKET", "REBUILD", "SummaryParts", "summary_parts"]

#: The bucket of calls whose C{duration_ms} has no logarithm (none, zero,
#: negative, not finite): below every real bucket.
NO_BUCKET: Final = -(2**31)
#: The fewest whole hours a window is answered from the tables with (as
#: SQLite's in-memory rollup: a shorter window reads the events, exact).
MIN_HOURS: Final = 3

_TIMED: Final = "duration_ms > 0 AND duration_ms <= 1e300"
_BUCKET: Final = f"floor(ln(duration_ms) * {HISTOGRAM_SCALE})::integer"
_BUCKET_OF: Final = f"CASE WHEN {_TIMED} THEN {_BUCKET} ELSE {NO_BUCKET} END"
_REASON_KEY: Final = (
    "sha256(convert_to(coalesce(length(price_ref)::text || ':' || price_ref, '-'), 'UTF8'))"
)

#: A totals row: calls, cost, unpriced, the token sums, errors, estimated
#: cost and calls, calls not forwarded and those of them unpriced.
SummaryParts = tuple[Sequence[Any], dict[int, int], list[tuple[Any, int]]]


def _latency_upsert(table: str, unit: str, of_hour: str, source: str, sign: str) -> str:
    return f"""
        INSERT INTO rollup_latency_{table} ({unit}, bucket, error, calls)
        SELECT {of_hour}, bucket, error, {sign}count(*)
        FROM (
            SELECT {_HOUR_OF} AS hour, {_BUCKET_OF} AS bucket, {ERROR_SQL} AS error
            FROM {source} WHERE kind = 'call' AND {_IN_RANGE}
        ) AS calls
        GROUP BY 1, 2, 3
        ORDER BY 1, 2, 3
        ON CONFLICT ({unit}, bucket, error)
            DO UPDATE SET calls = rollup_latency_{table}.calls + excluded.calls;"""


def _unpriced_upsert(table: str, unit: str, of_hour: str, source: str, sign: str) -> str:
    return f"""
        INSERT INTO rollup_unpriced_{table} ({unit}, key, price_ref, calls)
        SELECT {of_hour}, {_REASON_KEY}, price_ref, {sign}count(*)
        FROM (
            SELECT {_HOUR_OF} AS hour, price_ref
            FROM {source} WHERE kind = 'call' AND {_IN_RANGE}
                AND cost_usd IS NULL AND NOT {_NOT_FORWARDED}
        ) AS calls
        GROUP BY 1, price_ref
        ORDER BY 1, 2
        ON CONFLICT ({unit}, key)
            DO UPDATE SET calls = rollup_unpriced_{table}.calls + excluded.calls;"""


# (table suffix, its unit's column, how a call's hour gives that unit)
_UNITS: Final = tuple(
    (table.removeprefix("rollup_"), unit, of_hour) for table, unit, of_hour in _TABLES
)


def _upserts(source: str, sign: str) -> str:
    # every latency table, then every unpriced one: the same order in every
    # transaction, each table's rows in key order (two writers wait, never deadlock)
    return "".join(
        [_latency_upsert(t, u, o, source, sign) for t, u, o in _UNITS]
        + [_unpriced_upsert(t, u, o, source, sign) for t, u, o in _UNITS]
    )


def _drop_empty() -> str:
    out = []
    for kind in ("latency", "unpriced"):
        for table, unit, _ in _UNITS:
            low = f"(SELECT min({_HOUR_OF}) FROM deleted WHERE {_IN_RANGE})"
            high = f"(SELECT max({_HOUR_OF}) FROM deleted WHERE {_IN_RANGE})"
            if unit == "day":
                low, high = f"floor({low} / 24.0)", f"floor({high} / 24.0)"
            out.append(
                f"DELETE FROM rollup_{kind}_{table} WHERE calls = 0"
                f" AND {unit} >= {low} AND {unit} <= {high};"
            )
    return "\n        ".join(out)


def _trigger_function(name: str, source: str, sign: str, after: str = "") -> str:
    return f"""
    CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        {_upserts(source, sign)}
        {after}
        RETURN NULL;
    END
    $fn$;
    """


def _create_tables() -> str:
    out = []
    for table, unit, _ in _UNITS:
        out.append(f"""
    CREATE TABLE rollup_latency_{table} (
        {unit} bigint NOT NULL,
        bucket integer NOT NULL,
        error boolean NOT NULL,
        calls bigint NOT NULL,
        PRIMARY KEY ({unit}, bucket, error)
    );
    CREATE TABLE rollup_unpriced_{table} (
        {unit} bigint NOT NULL,
        key bytea NOT NULL,
        price_ref text,
        calls bigint NOT NULL,
        PRIMARY KEY ({unit}, key)
    );""")
    return "".join(out)


_TABLE_NAMES: Final = tuple(
    f"rollup_{kind}_{table}" for kind in ("latency", "unpriced") for table, _, _ in _UNITS
)

#: The summary's sums of every event stored, made again (migration 5 ends
#: with it; a person may run it, in one transaction).
REBUILD: Final = (
    "".join(f"\n    DELETE FROM {name};" for name in _TABLE_NAMES)
    + f"\n    DO $do$ BEGIN {_upserts('events', '')} END $do$;\n"
)

#: Migration 5: the tables, their triggers, and the sums of the events already stored.
MIGRATION: Final = f"""
    {_create_tables()}
    {_trigger_function("llmobserve_summary_add", "inserted", "")}
    {_trigger_function("llmobserve_summary_subtract", "deleted", "-", _drop_empty())}
    -- the triggers first: rows inserted meanwhile wait for this transaction
    CREATE TRIGGER events_summary_add AFTER INSERT ON events
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION llmobserve_summary_add();
    CREATE TRIGGER events_summary_subtract AFTER DELETE ON events
        REFERENCING OLD TABLE AS deleted
        FOR EACH STATEMENT EXECUTE FUNCTION llmobserve_summary_subtract();
    {REBUILD}
"""


def _units(first: int, end: int) -> tuple[str, str, list[Any], list[Any]]:
    """The conditions selecting the hourly rows and the daily rows that
    together hold the whole hours C{[first, end)}: the whole days from the
    daily table, the hours left at both ends from the hourly one."""
    day_first, day_end = -(-first // 24), end // 24
    if day_first >= day_end:
        return "hour >= %s AND hour < %s", "false", [first, end], []
    return (
        "(hour >= %s AND hour < %s OR hour >= %s AND hour < %s)",
        "day >= %s AND day < %s",
        [first, day_first * 24, day_end * 24, end],
        [day_first, day_end],
    )


def _union(
    selects: Sequence[tuple[str, str]],
    hours: tuple[str, str, list[Any], list[Any]],
    events: tuple[str, str, list[Any]],
) -> tuple[str, list[Any]]:
    """C{UNION ALL} of C{selects} (a select list and a table prefix: from
    its hourly and its daily table) and, when the window has edges, of
    C{events} (a select list and a condition, with its parameters)."""
    hourly, daily, hour_params, day_params = hours
    parts: list[str] = []
    params: list[Any] = []
    for columns, prefix in selects:
        parts.append(f"SELECT {columns} FROM {prefix}_hourly WHERE {hourly}")
        parts.append(f"SELECT {columns} FROM {prefix}_daily WHERE {daily}")
        params += [*hour_params, *day_params]
    columns, where, edge_params = events
    if where:
        parts.append(f"SELECT {columns} FROM events WHERE kind = 'call' AND {where}")
        params += edge_params
    return "\n    UNION ALL ".join(parts), params


#: The token sums, in L{CallSums}'s order (the rollup's columns of the same names).
_TOKEN_SUMS: Final = TOKENS
_ZEROS: Final = ", ".join(["0"] * len(_TOKEN_SUMS))


def _totals_sql(
    hours: tuple[str, str, list[Any], list[Any]], edges: tuple[str, list[Any]]
) -> tuple[str, list[Any]]:
    tokens = ", ".join(_TOKEN_SUMS)
    from_rollup = (
        f"calls, unpriced, cost, {tokens}, 0, estimated_cost, estimated_priced,"
        " estimated_calls, CASE WHEN not_forwarded THEN calls ELSE 0 END,"
        " CASE WHEN not_forwarded THEN unpriced ELSE 0 END"
    )
    from_latency = f"0, 0, 0, {_ZEROS}, CASE WHEN error THEN calls ELSE 0 END, 0, 0, 0, 0, 0"
    estimated = "usage_source = 'estimated'"
    from_events = (
        "1, CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END, coalesce(cost_usd::numeric, 0), "
        + ", ".join(f"coalesce({t}, 0)" for t in _TOKEN_SUMS)
        + f", CASE WHEN {ERROR_SQL} THEN 1 ELSE 0 END,"
        f" coalesce((CASE WHEN {estimated} THEN cost_usd END)::numeric, 0),"
        f" CASE WHEN {estimated} AND cost_usd IS NOT NULL THEN 1 ELSE 0 END,"
        f" CASE WHEN {estimated} THEN 1 ELSE 0 END,"
        f" CASE WHEN {_NOT_FORWARDED} THEN 1 ELSE 0 END,"
        f" CASE WHEN {_NOT_FORWARDED} AND cost_usd IS NULL THEN 1 ELSE 0 END"
    )
    rows, params = _union(
        [(from_rollup, "rollup"), (from_latency, "rollup_latency")],
        hours,
        (from_events, *edges),
    )
    names = (
        "calls, unpriced, cost, "
        + ", ".join(_TOKEN_SUMS)
        + ", errors, estimated_cost, estimated_priced, estimated_calls, nf, nf_unpriced"
    )
    sql = (
        "SELECT coalesce(sum(calls), 0),"
        " CASE WHEN sum(calls) > sum(unpriced) THEN sum(cost) END, sum(unpriced), "
        + ", ".join(f"sum({t})" for t in _TOKEN_SUMS)
        + ", sum(errors), CASE WHEN sum(estimated_priced) > 0 THEN sum(estimated_cost) END,"
        " sum(estimated_calls), sum(nf), sum(nf_unpriced)"
        f" FROM ({rows}) AS calls ({names})"
    )
    return sql, params


def summary_parts(
    read: Any, since: float | None, until: float | None, top_reasons: int
) -> SummaryParts | None:
    """An unfiltered window's summary sums from the tables: the totals row
    (L{CallSums.add_row<llmobserve.collector._rollup.CallSums.add_row>}'s
    order), calls per latency bucket, and the C{top_reasons} commonest
    C{price_ref} texts of the unpriced calls that went upstream with their
    counts (most first, then in byte order, NULL first, as the events give
    them). None when the window holds fewer than L{MIN_HOURS} whole hours.

    @param read: the store's L{read<llmobserve.collector._store.Store.read>}.
    """
    window = rollup_window(since, until)
    if window is None or window[1] - window[0] < MIN_HOURS:
        return None
    first, end = window
    hours = _units(first, end)
    edges = window_edges(first, end, since, until)
    sql, params = _totals_sql(hours, edges)
    ((*totals,),) = read(sql, params)
    timed = f" AND bucket <> {NO_BUCKET}"
    rows, params = _union(
        [("bucket, calls", "rollup_latency")],
        (hours[0] + timed, hours[1] + timed, hours[2], hours[3]),
        (f"{_BUCKET}, 1", f"{_TIMED} AND {edges[0]}" if edges[0] else "", edges[1]),
    )
    histogram = {
        int(bucket): int(calls)
        for bucket, calls in read(
            f"SELECT bucket, sum(calls) FROM ({rows}) AS calls (bucket, calls)"
            " GROUP BY bucket HAVING sum(calls) > 0",
            params,
        )
    }
    unpriced = f"cost_usd IS NULL AND NOT {_NOT_FORWARDED} AND {edges[0]}" if edges[0] else ""
    rows, params = _union(
        [("price_ref, calls", "rollup_unpriced")], hours, ("price_ref, 1", unpriced, edges[1])
    )
    reasons = [
        (text, int(n))
        for text, n in read(
            f"SELECT price_ref, sum(calls) AS n FROM ({rows}) AS calls (price_ref, calls)"
            " GROUP BY price_ref HAVING sum(calls) > 0 ORDER BY n DESC,"
            ' price_ref COLLATE "C" NULLS FIRST LIMIT %s',
            [*params, top_reasons],
        )
    ]
    return totals, histogram, reasons
