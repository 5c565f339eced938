"""Rate limits: calls or tokens per minute, for the same scopes as budgets.

A L{RateLimit} caps the calls (or the input + output tokens) of its scope
in each UTC minute. They are kept in a C{rate_limits} table of the store
(a SQLite file or a PostgreSQL database, as budgets are) by
L{RateLimitBook}, the budget book's C{limits}, and enforced by the
proxy with the budgets' reserve-and-settle ledger (see C{docs/BUDGETS.md}).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from llmobserve.collector._budgets import FAIL_MODES, SCOPE_FIELDS, BudgetError, scope_matches
from llmobserve.collector._definitions import DefinitionTable
from llmobserve.collector._sql import SqlConnection, as_sql

__all__ = ["UNITS", "RateLimit", "RateLimitBook"]

UNITS: Final = ("calls", "tokens")


@dataclass(frozen=True)
class RateLimit:
    """At most C{per_minute} calls or tokens (C{unit}) of a scope per UTC minute."""

    name: str
    per_minute: int
    unit: str = "calls"
    customer: str | None = None
    tenant: str | None = None
    section: str | None = None
    provider: str | None = None
    model: str | None = None
    project: str | None = None
    #: while a proxy cannot reach its collector (shared limits): C{closed}
    #: (use what was granted, then refuse) or C{open} (let calls through)
    fail: str = "closed"

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise BudgetError("a limit needs a name (at most 200 characters)")
        if isinstance(self.per_minute, bool) or not isinstance(self.per_minute, int):
            raise BudgetError("per_minute must be a whole number")
        if self.per_minute < 0:
            raise BudgetError("per_minute must not be negative")
        if self.unit not in UNITS:
            raise BudgetError(f"unit must be one of {', '.join(UNITS)}")
        if self.fail not in FAIL_MODES:
            raise BudgetError(f"fail must be one of {', '.join(FAIL_MODES)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RateLimit:
        """A limit from its JSON form (unknown keys are an error)."""
        extra = set(data) - {f.name for f in fields(cls)}
        if extra:
            raise BudgetError(f"unknown limit fields: {', '.join(sorted(extra))}")
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise BudgetError(str(e)) from None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (scope fields left out when unset, and C{fail} when
        it is the default: a store row an older proxy can still parse)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.fail == "closed":
            del out["fail"]
        return out

    def scope(self) -> dict[str, str]:
        """The scope fields that are set."""
        return {k: v for k in SCOPE_FIELDS if (v := getattr(self, k)) is not None}

    def counts_same(self, other: object) -> bool:
        """Does C{other} count the same thing of the same calls?"""
        return isinstance(other, RateLimit) and (self.unit, self.scope()) == (
            other.unit,
            other.scope(),
        )

    def window_start(self, now: float) -> float:
        """The UTC minute holding C{now}."""
        return math.floor(now / 60.0) * 60.0

    def window_end(self, now: float) -> float:
        """The end of the UTC minute holding C{now}."""
        return self.window_start(now) + 60.0

    def matches(
        self,
        provider: str | None,
        model: str | None,
        customer: str | None,
        tenant: str | None,
        section_path: str | None,
        project: str | None = None,
    ) -> bool:
        """Does a call with these labels count against this limit?"""
        return scope_matches(self, provider, model, customer, tenant, section_path, project)


class RateLimitBook:
    """Rate limits in the store's C{rate_limits} table (created here on
    SQLite, by the migrations on PostgreSQL)."""

    def __init__(self, db: sqlite3.Connection | SqlConnection) -> None:
        self._limits = DefinitionTable(as_sql(db), "rate_limits", RateLimit.from_dict)

    def set(self, limit: RateLimit) -> None:
        """Create or replace the limit of that name."""
        self._limits.set(limit)

    def list(self) -> list[RateLimit]:
        """Every limit, by name (a row that no longer parses is skipped)."""
        return self._limits.list()

    def delete(self, name: str) -> bool:
        """Remove a limit; False when there was none of that name."""
        return self._limits.delete(name)
