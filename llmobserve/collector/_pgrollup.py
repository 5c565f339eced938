"""PostgreSQL's hourly rollup: call sums per hour and report dimension,
kept by the database in the same transaction as every insert and delete.

Table C{rollup_hourly} holds, per hour and per combination of the report's
dimensions (provider, model, endpoint, customer, tenant, section, section
path, project, and whether the proxy answered the call itself), the calls,
unpriced calls, cost, token sums and estimated cost and calls of the
C{call} events whose C{ts} falls in that hour. Two statement-level
triggers on C{events} keep it: after an insert they add the rows the
statement really inserted (its transition table: a duplicate skipped by
C{ON CONFLICT (id) DO NOTHING} is not in it), after a delete (retention)
they subtract the rows deleted. So it is exact whoever writes (every
collector, an older one, retention, a person with C{psql}), it commits or
rolls back with the rows, and two collectors upsert its rows in key order
(C{ORDER BY hour, key}), so they wait for each other rather than deadlock.

A report whose groups and filters are all dimensions of the rollup is
answered from its whole hours inside the window plus the window's ragged
edges read from the events (L{report_sql}); any other reads the events.
Money and token sums are C{numeric}, as the events report sums them, so
both give the same figures to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._store import _TOKEN_COLUMNS, NOT_FORWARDED

__all__ = [
    "END_HOUR",
    "FIRST_HOUR",
    "MIGRATION",
    "REBUILD",
    "ROLLUP_FILTERS",
    "ROLLUP_GROUPS",
    "report_sql",
    "rollup_window",
    "window_edges",
]

HOUR: Final = 3600
DAY: Final = 86_400
#: The C{ts} the rollup covers: the whole hours of the years 1 to 9999,
#: which the C{day} and C{hour} groups can name (a call outside, or without
#: a C{ts}, is read from the events; so are those of 9999-12-31 23:00 on).
FIRST_HOUR: Final = -62_135_596_800 // HOUR
END_HOUR: Final = 253_402_300_799 // HOUR

#: The dimension columns, as the events name them (C{project} is the
#: events' C{extra ->> 'project'}).
_DIMENSIONS: Final = (
    "provider",
    "model",
    "endpoint",
    "customer_id",
    "tenant_id",
    "section",
    "section_path",
    "project",
)

#: Report groups and filters the rollup answers (over L{report_sql}'s rows).
_LABELS: Final = ("provider", "model", "endpoint", "customer", "tenant", "section", "section_path")
ROLLUP_GROUPS: Final[frozenset[str]] = frozenset((*_LABELS, "project", "day", "hour"))
#: (kind too: a report counts calls whatever it is given)
ROLLUP_FILTERS: Final[frozenset[str]] = frozenset((*_LABELS, "project", "kind"))

_NOT_FORWARDED: Final = (
    "coalesce(outcome, '') IN (" + ", ".join(f"'{o}'" for o in NOT_FORWARDED) + ")"
)
_EVENTS_PROJECT: Final = "(extra::jsonb ->> 'project')"
# what the events' extra JSON gives as its project, parsed only when the
# text names one (the writer spells every key as it is, never escaped)
_NAMES_PROJECT: Final = "strpos(extra, '\"project\"') > 0"
_FAST_PROJECT: Final = f"CASE WHEN {_NAMES_PROJECT} THEN {_EVENTS_PROJECT} END"
_SAFE_PROJECT: Final = f"CASE WHEN {_NAMES_PROJECT} THEN llmobserve_project(extra) END"
# the largest whole hour not after ts (floor(ts / 3600) can round up by one)
_HOUR_OF: Final = (
    f"(floor(ts / {HOUR}) - CASE WHEN floor(ts / {HOUR}) * {HOUR} > ts THEN 1 ELSE 0 END)::bigint"
)

#: The calls the rollup counts: those with a C{ts} it covers.
_IN_RANGE: Final = f"ts >= {FIRST_HOUR * HOUR} AND ts < {END_HOUR * HOUR}"

#: The sums, each as added up from event rows.
_SUMS: Final = (
    ("calls", "bigint", "count(*)"),
    ("unpriced", "bigint", "sum(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END)"),
    ("cost", "numeric", "coalesce(sum(cost_usd::numeric), 0)"),
    *((t, "numeric", f"coalesce(sum({t}), 0)") for t in _TOKEN_COLUMNS),
    (
        "estimated_cost",
        "numeric",
        "coalesce(sum((CASE WHEN usage_source = 'estimated' THEN cost_usd END)::numeric), 0)",
    ),
    (
        "estimated_priced",
        "bigint",
        "sum(CASE WHEN usage_source = 'estimated' AND cost_usd IS NOT NULL THEN 1 ELSE 0 END)",
    ),
    ("estimated_calls", "bigint", "sum(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)"),
)
_SUM_NAMES: Final = tuple(name for name, _, _ in _SUMS)

# A dimension combination's key: each value with its length before it (or
# "-" for NULL), so no two combinations give the same text; hashed, so a
# long section path never outgrows an index entry.
_KEY: Final = (
    "sha256(convert_to(concat("
    + ", ".join(f"coalesce(length({d})::text || ':' || {d}, '-')" for d in _DIMENSIONS)
    + ", CASE WHEN not_forwarded THEN 'n' ELSE 'f' END), 'UTF8'))"
)


#: The rollup's tables: table, its time unit's column, and how a call's
#: C{hour} (L{_HOUR_OF}) gives that unit.
_TABLES: Final = (
    ("rollup_hourly", "hour", "hour"),
    # floor of a numeric: exact, and right for the hours before 1970 too
    ("rollup_daily", "day", "floor(hour / 24.0)::bigint"),
)


def _upsert(source: str, sign: str, project: str) -> str:
    """The statements adding (C{sign} C{+}) or subtracting (C{-}) the calls
    of C{source}, a transition table, to the rollup's tables, each in its
    key order."""
    return ";".join(
        _upsert_one(table, unit, of_hour, source, sign, project) for table, unit, of_hour in _TABLES
    )


def _upsert_one(table: str, unit: str, of_hour: str, source: str, sign: str, project: str) -> str:
    dims = ", ".join(_DIMENSIONS)
    sums = ", ".join(f"{sign}{expr}" for _, _, expr in _SUMS)
    updates = ", ".join(f"{n} = {table}.{n} + excluded.{n}" for n in _SUM_NAMES)
    return f"""
        INSERT INTO {table} ({unit}, key, not_forwarded, {dims}, {", ".join(_SUM_NAMES)})
        SELECT {of_hour}, {_KEY}, not_forwarded, {dims}, {sums}
        FROM (
            SELECT {_HOUR_OF} AS hour, {_NOT_FORWARDED} AS not_forwarded,
                provider, model, endpoint, customer_id, tenant_id, section, section_path,
                {project} AS project, cost_usd, usage_source, {", ".join(_TOKEN_COLUMNS)}
            FROM {source}
            WHERE kind = 'call' AND {_IN_RANGE}
        ) AS calls
        GROUP BY 1, not_forwarded, {dims}
        ORDER BY 1, 2
        ON CONFLICT ({unit}, key) DO UPDATE SET {updates}"""


def _upsert_safely(source: str, sign: str) -> str:
    """L{_upsert} in a PL/pgSQL block: a project the JSON text cannot give
    (a \\u0000, which jsonb refuses) must not fail the insert, so the
    statement is tried again with the project read row by row, NULL where
    it cannot be."""
    return f"""
        BEGIN
            {_upsert(source, sign, _FAST_PROJECT)};
        EXCEPTION WHEN data_exception THEN
            {_upsert(source, sign, _SAFE_PROJECT)};
        END;"""


def _trigger_function(name: str, source: str, sign: str, after: str = "") -> str:
    return f"""
    CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        {_upsert_safely(source, sign)}
        {after}
        RETURN NULL;
    END
    $fn$;
    """


# combinations whose calls were all deleted, among the hours (days) just touched
_DROP_EMPTY: Final = f"""
        DELETE FROM rollup_hourly WHERE calls = 0
            AND hour >= (SELECT min({_HOUR_OF}) FROM deleted WHERE {_IN_RANGE})
            AND hour <= (SELECT max({_HOUR_OF}) FROM deleted WHERE {_IN_RANGE});
        DELETE FROM rollup_daily WHERE calls = 0
            AND day >= (SELECT floor(min({_HOUR_OF}) / 24.0) FROM deleted WHERE {_IN_RANGE})
            AND day <= (SELECT floor(max({_HOUR_OF}) / 24.0) FROM deleted WHERE {_IN_RANGE});"""


def _create_table(table: str, unit: str) -> str:
    return f"""
    CREATE TABLE {table} (
        {unit} bigint NOT NULL,
        key bytea NOT NULL,
        not_forwarded boolean NOT NULL,
        {", ".join(f"{d} text" for d in _DIMENSIONS)},
        {", ".join(f"{name} {kind} NOT NULL" for name, kind, _ in _SUMS)},
        PRIMARY KEY ({unit}, key)
    );"""


#: The sums of every event stored, made again (migration 4 ends with it;
#: the benchmark times it; a person may run it, in one transaction).
REBUILD: Final = f"""
    DELETE FROM rollup_hourly;
    DELETE FROM rollup_daily;
    DO $do$ BEGIN {_upsert_safely("events", "")} END $do$;
"""

#: Migration 4: the table, its triggers, and the sums of the events already stored.
MIGRATION: Final = f"""
    {"".join(_create_table(table, unit) for table, unit, _ in _TABLES)}
    CREATE FUNCTION llmobserve_project(extra text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $fn$
    BEGIN
        RETURN extra::jsonb ->> 'project';
    EXCEPTION WHEN data_exception THEN
        RETURN NULL;
    END
    $fn$;
    {_trigger_function("llmobserve_rollup_add", "inserted", "")}
    {_trigger_function("llmobserve_rollup_subtract", "deleted", "-", _DROP_EMPTY)}
    -- the trigger first: rows inserted meanwhile wait for this transaction
    CREATE TRIGGER events_rollup_add AFTER INSERT ON events
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION llmobserve_rollup_add();
    CREATE TRIGGER events_rollup_subtract AFTER DELETE ON events
        REFERENCING OLD TABLE AS deleted
        FOR EACH STATEMENT EXECUTE FUNCTION llmobserve_rollup_subtract();
    {REBUILD}
"""


def rollup_window(since: float | None, until: float | None) -> tuple[int, int] | None:
    """The whole hours C{[first, end)} of a window the rollup answers, or
    None when it holds none."""
    first = FIRST_HOUR if since is None else max(FIRST_HOUR, math.ceil(since / HOUR))
    end = END_HOUR if until is None else min(END_HOUR, math.floor(until / HOUR))
    return (first, end) if first < end else None


def report_sql(
    groups: Sequence[str],
    group_exprs: Mapping[str, str],
    hours: tuple[int, int],
    since: float | None,
    until: float | None,
    where: str,
    params: Sequence[Any],
    order: str,
    project: bool,
) -> tuple[str, list[Any]]:
    """A report's query from the rollup's whole C{hours} plus the events
    of the window outside them: the whole days among those hours from
    C{rollup_daily} (unless the report groups by hour), the hours left
    from C{rollup_hourly}.

    @param group_exprs: each group's SQL over the rows of both (L{ROLLUP_GROUPS}).
    @param where: the report's filters over the same rows (a C{WHERE} clause
        or C{""}), with their C{params}.
    @param order: the report's ORDER BY terms.
    @param project: whether the groups or filters name the project.
    """
    first, end = hours
    edges, edge_params = window_edges(first, end, since, until)
    dims = "provider, model, endpoint, customer_id, tenant_id, section, section_path"
    estimated = "usage_source = 'estimated'"
    sums = ", ".join(_SUM_NAMES)
    day_first, day_end = -(-first // 24), end // 24
    if "hour" in groups or day_first >= day_end:
        day_first = day_end = first // 24  # no whole day (or the hours are asked for)
    rows = f"""
        SELECT hour * {HOUR}.0 AS ts, {dims}, project, {sums}
        FROM rollup_hourly WHERE NOT not_forwarded
            AND (hour >= %s AND hour < %s OR hour >= %s AND hour < %s)
        UNION ALL
        SELECT day * {DAY}.0 AS ts, {dims}, project, {sums}
        FROM rollup_daily WHERE NOT not_forwarded AND day >= %s AND day < %s"""
    row_params: list[Any] = [
        first,
        max(first, day_first * 24),
        max(first, day_end * 24),
        end,
        day_first,
        day_end,
    ]
    if edges:
        rows += f"""
        UNION ALL
        SELECT ts, {dims}, {_EVENTS_PROJECT if project else "NULL::text"},
            1, CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END, coalesce(cost_usd::numeric, 0),
            {", ".join(f"coalesce({t}, 0)" for t in _TOKEN_COLUMNS)},
            coalesce((CASE WHEN {estimated} THEN cost_usd END)::numeric, 0),
            CASE WHEN {estimated} AND cost_usd IS NOT NULL THEN 1 ELSE 0 END,
            CASE WHEN {estimated} THEN 1 ELSE 0 END
        FROM events
        WHERE kind = 'call' AND NOT {_NOT_FORWARDED} AND {edges}"""
        row_params += edge_params
    select = [f"{group_exprs[g]} AS g{i}" for i, g in enumerate(groups)]
    select += [
        "coalesce(sum(calls), 0) AS n",
        "CASE WHEN sum(calls) > sum(unpriced) THEN sum(cost) END AS cost",
        "sum(unpriced)",
        *(f"sum({t})" for t in _TOKEN_COLUMNS),
        "CASE WHEN sum(estimated_priced) > 0 THEN sum(estimated_cost) END",
        "sum(estimated_calls)",
    ]
    sql = f"SELECT {', '.join(select)} FROM ({rows}) AS calls{where}"
    if groups:
        # (a group whose calls were all deleted since has no row, as in the events)
        sql += f" GROUP BY {', '.join(f'g{i}' for i in range(len(groups)))} HAVING sum(calls) > 0"
    sql += f" ORDER BY {order}"
    return sql, [*row_params, *params]


def window_edges(
    first: int, end: int, since: float | None, until: float | None
) -> tuple[str, list[Any]]:
    """The condition on C{ts} selecting the window's calls outside the whole
    hours C{[first, end)} (those the tables do not hold), or C{""}."""
    edges: list[str] = []
    params: list[Any] = []
    low, high = float(first * HOUR), float(end * HOUR)
    if since is None:
        edges.append("ts < %s")
        params.append(low)
    elif since < low:
        edges.append("(ts >= %s AND ts < %s)")
        params += [since, low]
    if until is None:
        edges.append("ts >= %s")
        params.append(high)
    elif high < until:
        edges.append("(ts >= %s AND ts < %s)")
        params += [high, until]
    if since is None and until is None:
        edges.append("ts IS NULL")
    return ("(" + " OR ".join(edges) + ")" if edges else ""), params
