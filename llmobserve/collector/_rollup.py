"""Sums of calls per hour and per day, kept in memory by the reader, so the
dashboard's long windows read a few thousand sums instead of a million rows.

Events are only ever inserted (never updated or deleted; a resent event is
ignored), and SQLite gives each new row a larger C{rowid}. So the sums are
kept exact by adding the rows past the last C{rowid} seen, before each
query: a late event (a proxy's spool resent after an outage) lands in the
hour it belongs to like any other. A window is answered from the whole
hours (or days) inside it plus its two ragged edges read from the events.

Totals, providers and models (the overview's figures and its chart) are
summed per hour, together with a latency histogram; customers, tenants,
section paths and endpoints, which can be many, per day. Only unfiltered
questions are answered here; a filtered one reads the events.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

from ._store import NOT_FORWARDED, EventStore

__all__ = [
    "DAILY",
    "DAY",
    "HOUR",
    "HOURLY",
    "NOT_FORWARDED_SQL",
    "ONLY",
    "SUMS_SQL",
    "CallSums",
    "Rollup",
    "sums_sql",
]

HOUR: Final = 3600
DAY: Final = 86_400
#: Dimension -> column, summed per hour ("" is the grand total).
HOURLY: Final[dict[str, str]] = {"": "NULL", "provider": "provider", "model": "model"}
#: Dimension -> column, summed per day.
DAILY: Final[dict[str, str]] = {
    "customer": "customer_id",
    "tenant": "tenant_id",
    "section_path": "section_path",
    "endpoint": "endpoint",
    "reason": "price_ref",  # calls without a price only: why they have none
}
#: The rows each dimension counts beyond C{kind = 'call'}.
ONLY: Final[dict[str, str]] = {"reason": " AND cost_usd IS NULL"}
#: Histogram buckets per factor of e of C{duration_ms}: each bucket is
#: about 5 % wide, so a percentile read from it is within 2.5 %.
HISTOGRAM_SCALE: Final = 20.0
#: The most distinct values of one dimension kept for one day; past it the
#: rollup gives up on that dimension (a question about it reads the events).
MAX_VALUES_PER_DAY: Final = 20_000

TOKENS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)

#: Calls the proxy answered itself (L{EventStore.report} leaves them out).
NOT_FORWARDED_SQL: Final = (
    "coalesce(outcome, '') IN (" + ", ".join(f"'{o}'" for o in NOT_FORWARDED) + ")"
)

#: What counts as an error, for callers that need it alone.
ERROR_SQL: Final = "(coalesce(outcome, 'ok') != 'ok' OR coalesce(status, 0) >= 400)"


def _count_of(condition: str) -> str:
    # sum(CASE ...), not sum(condition): PostgreSQL sums no booleans
    return f"sum(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def sums_sql(cost_sum: Callable[[str], str] = lambda expr: f"sum({expr})") -> str:
    """The sums one row of the events gives, in L{CallSums.add_row}'s order,
    in SQL both back ends run.

    @param cost_sum: the back end's sum of a cost expression
        (L{Store.cost_sum<llmobserve.collector._store.Store.cost_sum>}).
    """
    return ", ".join(
        [
            "count(*)",
            cost_sum("cost_usd"),
            _count_of("cost_usd IS NULL"),
            *(f"sum({t})" for t in TOKENS),
            _count_of(ERROR_SQL),
            cost_sum("CASE WHEN usage_source = 'estimated' THEN cost_usd END"),
            _count_of("usage_source = 'estimated'"),
            _count_of(NOT_FORWARDED_SQL),
            _count_of(f"{NOT_FORWARDED_SQL} AND cost_usd IS NULL"),
        ]
    )


#: L{sums_sql} for SQLite (the in-memory rollup's refresh).
SUMS_SQL: Final = sums_sql()


class CallSums:
    """Calls, cost (None until a priced call is added), unpriced calls, the
    five token counts, errors, the cost and calls priced from estimated
    usage, and the calls the proxy answered itself (refused, unpriced:
    what a report leaves out; they carry no tokens and no cost, since
    nothing went upstream), added up."""

    __slots__ = (
        "calls",
        "cost",
        "errors",
        "estimated",
        "estimated_cost",
        "not_forwarded",
        "not_forwarded_unpriced",
        "tokens",
        "unpriced",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.cost: float | None = None
        self.unpriced = 0
        self.tokens = [0] * len(TOKENS)
        self.errors = 0
        self.estimated_cost: float | None = None
        self.estimated = 0
        self.not_forwarded = 0
        self.not_forwarded_unpriced = 0

    def add_row(self, row: tuple[Any, ...] | list[Any]) -> None:
        """Add one result row of L{SUMS_SQL}."""
        # int() and float(): PostgreSQL sums integers and costs as numeric
        calls, cost, unpriced, *rest = row
        self.calls += int(calls or 0)
        self.cost = _plus(self.cost, cost)
        self.unpriced += int(unpriced or 0)
        for i in range(len(TOKENS)):
            self.tokens[i] += int(rest[i] or 0)
        errors, estimated_cost, estimated, not_forwarded, nf_unpriced = rest[len(TOKENS) :]
        self.errors += int(errors or 0)
        self.estimated_cost = _plus(self.estimated_cost, estimated_cost)
        self.estimated += int(estimated or 0)
        self.not_forwarded += int(not_forwarded or 0)
        self.not_forwarded_unpriced += int(nf_unpriced or 0)

    def add(self, other: CallSums) -> None:
        self.add_row(
            [
                other.calls,
                other.cost,
                other.unpriced,
                *other.tokens,
                other.errors,
                other.estimated_cost,
                other.estimated,
                other.not_forwarded,
                other.not_forwarded_unpriced,
            ]
        )


def _plus(total: float | None, value: Any) -> float | None:
    """A sum that stays None (unknown) until a known value is added."""
    if value is None:
        return total
    added = float(value)
    return added if total is None else total + added


class Rollup:
    """The hourly and daily sums of one store's calls (the reader's, in its thread)."""

    def __init__(self) -> None:
        self._rowid = 0
        #: dimension -> (hour or day, value) -> sums
        self._sums: dict[str, dict[tuple[int, Any], CallSums]] = {
            dim: {} for dim in (*HOURLY, *DAILY)
        }
        #: (hour, histogram bucket) -> calls
        self._latency: dict[tuple[int, int], int] = {}
        #: (dimension, day) -> how many values it holds
        self._width: dict[tuple[str, int], int] = {}
        self._given_up: set[str] = set()
        self._caught_up = False

    @property
    def caught_up(self) -> bool:
        """Whether the last L{refresh} added every row then stored."""
        return self._caught_up

    def refresh(self, store: EventStore, limit: int | None = None) -> None:
        """Add the rows stored since the last refresh, at most C{limit} of
        them (by C{rowid}); L{caught_up} says whether any are left."""
        ((top,),) = store.read("SELECT max(rowid) FROM events")
        if top is None or top <= self._rowid:
            self._caught_up = True
            return
        end = top if limit is None else min(top, self._rowid + limit)
        self._caught_up = end == top
        span = [self._rowid, end]
        where = "WHERE rowid > ? AND rowid <= ? AND kind = 'call' AND ts IS NOT NULL"
        hour = f"CAST(floor(ts / {HOUR}) AS INTEGER)"
        day = f"CAST(floor(ts / {DAY}) AS INTEGER)"
        for dim, column in HOURLY.items():
            rows = store.read(
                f"SELECT {hour}, {column}, {SUMS_SQL} FROM events {where} GROUP BY 1, 2", span
            )
            self._add(dim, rows)
        for dim, column in DAILY.items():
            if dim in self._given_up:
                continue
            only = ONLY.get(dim, "")
            rows = store.read(
                f"SELECT {day}, {column}, {SUMS_SQL} FROM events {where}{only} GROUP BY 1, 2",
                span,
            )
            self._add(dim, rows)
        for unit, bucket, calls in store.read(
            f"SELECT {hour}, CAST(floor(ln(duration_ms) * {HISTOGRAM_SCALE}) AS INTEGER), count(*)"
            f" FROM events {where} AND duration_ms > 0 GROUP BY 1, 2",
            span,
        ):
            key = (unit, bucket)
            self._latency[key] = self._latency.get(key, 0) + calls
        self._rowid = end

    def _add(self, dim: str, rows: Iterable[tuple[Any, ...]]) -> None:
        sums = self._sums[dim]
        for unit, value, *row in rows:
            key = (unit, value)
            found = sums.get(key)
            if found is None:
                width = self._width.get((dim, unit), 0) + 1
                self._width[(dim, unit)] = width
                if dim in DAILY and width > MAX_VALUES_PER_DAY:
                    self._give_up(dim)
                    return
                found = sums[key] = CallSums()
            found.add_row(row)

    def _give_up(self, dim: str) -> None:
        self._given_up.add(dim)
        self._sums[dim] = {}

    def covers(self, dim: str) -> bool:
        """Whether window questions about C{dim} can be answered here."""
        return (dim in HOURLY or dim in DAILY) and dim not in self._given_up

    @staticmethod
    def whole_units(dim: str, since: float, until: float) -> tuple[int, int, int]:
        """The unit size and the first and last (exclusive) whole units of
        C{dim}'s sums inside the window."""
        size = HOUR if dim in HOURLY else DAY
        return size, math.ceil(since / size), math.floor(until / size)

    def sums(self, dim: str, first: int, last: int) -> dict[Any, CallSums]:
        """C{dim}'s sums per value over units C{first} to C{last} (exclusive)."""
        out: dict[Any, CallSums] = {}
        for (unit, value), found in self._sums[dim].items():
            if first <= unit < last:
                into = out.get(value)
                if into is None:
                    into = out[value] = CallSums()
                into.add(found)
        return out

    def series(self, dim: str, first: int, last: int) -> dict[tuple[int, Any], CallSums]:
        """C{dim}'s hourly sums per (hour, value) over hours C{first} to C{last}."""
        return {key: found for key, found in self._sums[dim].items() if first <= key[0] < last}

    def latency(self, first: int, last: int) -> dict[int, int]:
        """Calls per histogram bucket over hours C{first} to C{last}."""
        out: dict[int, int] = {}
        for (unit, bucket), calls in self._latency.items():
            if first <= unit < last:
                out[bucket] = out.get(bucket, 0) + calls
        return out
