"""Budget definitions and the spend they count, kept in the store.

A L{Budget} is a limit in USD over a window (C{hour}, C{day}, C{month} in
UTC or a named time zone, or C{total}) for a scope (every call, or the calls
whose labels match each scope field given: customer, tenant, section-path
prefix, provider, model, project). L{SqlBudgetBook} keeps them in a C{budgets}
table of the store and sums the spend of a budget from its C{events}
table, on either back end (L{SqlConnection}: a SQLite file, or a PostgreSQL
database that several collectors share); L{SQLiteBudgetBook} is one on a
store file, on a connection of its own. C{Store.budget_book()} gives the
book of an open store.

No Twisted here: the CLI and the proxy's poller (in a thread) use it.
"""

from __future__ import annotations

import builtins
import math
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llmobserve.collector._definitions import DefinitionTable
from llmobserve.collector._sql import MissingTable, SqlConnection, SQLiteSql

__all__ = [
    "SCOPE_FIELDS",
    "WINDOWS",
    "Budget",
    "BudgetBook",
    "BudgetError",
    "SQLiteBudgetBook",
    "SqlBudgetBook",
    "check_scope_provider",
]

WINDOWS: Final = ("hour", "day", "month", "total")
ACTIONS: Final = ("block", "warn")
UNPRICED: Final = ("allow", "block")
FAIL_MODES: Final = ("closed", "open")
#: Scope field -> the event column (or SQL expression) it tests (section is
#: a path prefix). The one list of scope fields: budgets, rate limits, the
#: command line's options and the spend queries all follow it. A key's
#: project is not a column of the events table: it is kept in the extra
#: JSON, as the store's C{project} filter reads it.
SCOPE_FIELDS: Final = {
    "customer": "customer_id",
    "tenant": "tenant_id",
    "section": "section_path",
    "provider": "provider",
    "model": "model",
    "project": "json_extract(extra, '$.project')",
}


class BudgetError(ValueError):
    """A budget definition that cannot be used (the message says why)."""


def check_scope_provider(provider: str | None, where: str = "provider") -> None:
    """A budget's or a rate limit's C{provider} must be a registry id: a
    misspelt one (C{opneai}) matches no call, so the budget would never
    apply. Checked where a definition comes in (the command line, the
    HTTP API), not where one is read back from the store.

    @raise BudgetError: naming the closest id.
    """
    if provider is None:
        return
    from llmobserve.providers import UnknownProviderError, check_provider_id

    try:
        check_provider_id(provider, where)
    except UnknownProviderError as e:
        raise BudgetError(str(e)) from None


@dataclass(frozen=True)
class Budget:
    """One budget: what it limits, over which window, and what happens past it.

    @ivar unpriced: a call whose worst case has no price: C{allow} (let it
        through, flagged) or C{block}.
    @ivar fail: while a proxy cannot reach its collector (shared budgets):
        C{closed} (spend what was granted, then refuse) or C{open} (let
        calls through, flagged C{budget_fail_open}).
    """

    name: str
    limit_usd: float
    window: str = "total"
    tz: str = "UTC"
    action: str = "block"
    unpriced: str = "allow"
    fail: str = "closed"
    customer: str | None = None
    tenant: str | None = None
    section: str | None = None
    provider: str | None = None
    model: str | None = None
    project: str | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise BudgetError("a budget needs a name (at most 200 characters)")
        if not (isinstance(self.limit_usd, int | float) and math.isfinite(self.limit_usd)):
            raise BudgetError("limit_usd must be a finite number")
        if self.limit_usd < 0:
            raise BudgetError("limit_usd must not be negative")
        if self.window not in WINDOWS:
            raise BudgetError(f"window must be one of {', '.join(WINDOWS)}")
        if self.action not in ACTIONS:
            raise BudgetError(f"action must be one of {', '.join(ACTIONS)}")
        if self.unpriced not in UNPRICED:
            raise BudgetError(f"unpriced must be one of {', '.join(UNPRICED)}")
        if self.fail not in FAIL_MODES:
            raise BudgetError(f"fail must be one of {', '.join(FAIL_MODES)}")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise BudgetError(f"unknown time zone {self.tz!r}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """A budget from its JSON form (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise BudgetError(f"unknown budget fields: {', '.join(sorted(extra))}")
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise BudgetError(str(e)) from None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (scope fields left out when unset)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def scope(self) -> dict[str, str]:
        """The scope fields that are set."""
        return {k: v for k in SCOPE_FIELDS if (v := getattr(self, k)) is not None}

    def counts_same(self, other: Budget) -> bool:
        """Does C{other} count the same calls over the same window (so its
        spend so far is this one's)?"""
        return (self.window, self.tz, self.scope()) == (other.window, other.tz, other.scope())

    def window_start(self, now: float) -> float:
        """Unix time the window holding C{now} began (C{-inf} for C{total})."""
        if self.window == "total":
            return -math.inf
        local = datetime.fromtimestamp(now, ZoneInfo(self.tz))
        if self.window == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
        elif self.window == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp()

    def window_end(self, now: float) -> float:
        """Unix time the window holding C{now} ends (C{inf} for C{total})."""
        if self.window == "total":
            return math.inf
        zone = ZoneInfo(self.tz)
        start = datetime.fromtimestamp(self.window_start(now), zone)
        if self.window == "hour":
            return self.window_start(now) + 3600.0
        if self.window == "day":
            nxt = (start + timedelta(days=1, hours=12)).replace(hour=0)
        else:
            nxt = (start + timedelta(days=32)).replace(day=1)
        return nxt.replace(tzinfo=zone).timestamp()

    def matches(
        self,
        provider: str | None,
        model: str | None,
        customer: str | None,
        tenant: str | None,
        section_path: str | None,
        project: str | None = None,
    ) -> bool:
        """Does a call with these labels count against this budget?"""
        return scope_matches(self, provider, model, customer, tenant, section_path, project)


class BudgetBook(Protocol):
    """Where budgets are kept and their spend is summed."""

    def set(self, budget: Budget) -> None:
        """Create or replace the budget of that name."""

    def list(self) -> list[Budget]:
        """Every budget, by name."""

    def delete(self, name: str) -> bool:
        """Remove a budget; False when there was none of that name."""

    def spend(self, budget: Budget, now: float) -> float:
        """Priced spend recorded for the budget's scope in its current window."""


class SqlBudgetBook:
    """Budgets in the store's C{budgets} table; spend from its events.

    @param db: the store's connection (L{Store.sql}), for one thread at a
        time; on SQLite the tables are created if missing (on PostgreSQL
        the store's migrations made them).
    @param on_close: what L{close} does (closing a store the book was
        opened with); by default nothing: the connection is the store's.
    """

    def __init__(self, db: SqlConnection, on_close: Callable[[], None] | None = None) -> None:
        from llmobserve.collector._limits import RateLimitBook  # it imports this module

        self._db = db
        self._on_close = on_close
        self._budgets = DefinitionTable(db, "budgets", Budget.from_dict)
        #: the rate limits kept in the same store (C{rate_limits} table)
        self.limits = RateLimitBook(db)

    @property
    def connection(self) -> SqlConnection:
        """The store's connection (for the grants kept in the same store)."""
        return self._db

    def set(self, budget: Budget) -> None:
        """Create or replace the budget of that name."""
        self._budgets.set(budget)

    def list(self) -> list[Budget]:
        """Every budget, by name (a row that no longer parses is skipped)."""
        return self._budgets.list()

    def delete(self, name: str) -> bool:
        """Remove a budget; False when there was none of that name."""
        return self._budgets.delete(name)

    def spend(self, budget: Budget, now: float) -> float:
        """Sum of C{cost_usd} of the call events in the budget's scope since
        its window began (0 when the store has no events table yet)."""
        where, params = spend_filter(budget, now, columns=self._db.scope_sql)
        try:
            row = self._db.execute(
                f"SELECT COALESCE(SUM(cost_usd), 0) FROM events WHERE {where}", params
            ).fetchone()
        except MissingTable:
            return 0.0
        return float(row[0])

    def status(self, now: float) -> builtins.list[dict[str, Any]]:
        """Each budget's definition with its spend and what is left in its
        window (C{llmobserve budgets list}, C{report}, C{GET /api/budgets})."""
        rows = []
        for budget in self.list():
            # to the nano-dollar, as the ledger counts: a sum of floats and a
            # difference read 0.00044000000000000007 in the JSON
            spend = round(self.spend(budget, now), 9)
            start = budget.window_start(now)
            rows.append(
                {
                    **budget.as_dict(),
                    "spend_usd": spend,
                    "remaining_usd": round(max(0.0, budget.limit_usd - spend), 9),
                    "window_start": None if start == -math.inf else start,
                }
            )
        return rows

    def used(self, limit: Any, now: float) -> int:
        """Calls (or input + output tokens) recorded in a rate limit's scope
        in its current minute (0 when the store has no events table yet)."""
        where, params = spend_filter(limit, now, priced=False, columns=self._db.scope_sql)
        what = (
            "COUNT(*)"
            if limit.unit == "calls"
            else "COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)"
        )
        try:
            row = self._db.execute(f"SELECT {what} FROM events WHERE {where}", params).fetchone()
        except MissingTable:
            return 0
        return int(row[0])

    def spends(self, budgets: Sequence[Budget], now: float) -> dict[str, float]:
        """L{spend} of each budget, by name."""
        return {b.name: self.spend(b, now) for b in budgets}

    def close(self) -> None:
        """Done with the book (the store's connection stays open unless
        C{on_close} closes it)."""
        if self._on_close is not None:
            self._on_close()


class SQLiteBudgetBook(SqlBudgetBook):
    """L{SqlBudgetBook} on a store file, with a connection of its own."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = sqlite3.connect(
            self.path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        super().__init__(SQLiteSql(self._file), on_close=self._file.close)


class _Scoped(Protocol):
    """A budget's or a rate limit's scope: each field None means any."""

    @property
    def provider(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def customer(self) -> str | None: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def section(self) -> str | None: ...
    @property
    def project(self) -> str | None: ...


def scope_matches(
    rule: _Scoped,
    provider: str | None,
    model: str | None,
    customer: str | None,
    tenant: str | None,
    section_path: str | None,
    project: str | None = None,
) -> bool:
    """Does a call with these labels fall in C{rule}'s scope (budgets and
    rate limits alike)? A section prefix also takes the paths nested under it.
    C{project} is the project of the key the call came with (None: no key,
    which no project scope matches)."""
    if rule.project is not None and project != rule.project:
        return False
    if rule.provider is not None and provider != rule.provider:
        return False
    if rule.model is not None and not model_matches(rule.model, model):
        return False
    if rule.customer is not None and customer != rule.customer:
        return False
    if rule.tenant is not None and tenant != rule.tenant:
        return False
    if rule.section is not None:
        if section_path is None:
            return False
        prefix = rule.section.rstrip("/")
        return section_path == prefix or section_path.startswith(prefix + "/")
    return True


def model_matches(wanted: str, model: str | None) -> bool:
    """C{model} is C{wanted} or one of its dated snapshots (C{gpt-4o} matches
    C{gpt-4o-2024-08-06}, not C{gpt-4o-mini})."""
    if model is None:
        return False
    if model == wanted:
        return True
    n = len(wanted)
    return model[: n + 1] == wanted + "-" and model[n + 1 : n + 2].isdigit()


def spend_filter(
    budget: Any, now: float, *, priced: bool = True, columns: Mapping[str, str] | None = None
) -> tuple[str, list[Any]]:
    """The SQL condition (and its parameters) selecting the call events of a
    budget's (or a rate limit's) scope in its current window: the priced
    ones, or (C{priced=False}) every call that reached an upstream.

    @param columns: the back end's SQL for a scope field that is not the
        plain column L{SCOPE_FIELDS} names (L{SqlConnection.scope_sql}).
    """
    if priced:
        clauses = ["kind = 'call'", "cost_usd IS NOT NULL"]
    else:
        clauses = ["kind = 'call'", "outcome NOT IN ('refused', 'proxy_error', 'budget_refused')"]
    params: list[Any] = []
    start = budget.window_start(now)
    if start != -math.inf:
        clauses.append("ts >= ?")
        params.append(start)
    for key, column in SCOPE_FIELDS.items():
        column = (columns or {}).get(key, column)
        value = getattr(budget, key)
        if value is None:
            continue
        if key == "model":
            clauses.append(
                f"({column} = ? OR (substr({column}, 1, ?) = ?"
                f" AND substr({column}, ?, 1) BETWEEN '0' AND '9'))"
            )
            params += [value, len(value) + 1, value + "-", len(value) + 2]
        elif key == "section":
            prefix = value.rstrip("/")
            column = "COALESCE(section_path, section)"  # as the proxy matches it
            clauses.append(f"({column} = ? OR substr({column}, 1, ?) = ?)")
            params += [prefix, len(prefix) + 1, prefix + "/"]
        else:
            clauses.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(clauses), params
