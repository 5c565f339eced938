"""Slices of a budget granted to each proxy process that shares one store.

Several processes enforcing the same budget (C{--workers}, or proxies on
one store file with C{--shared-budgets}) each spend only what the store
granted them: a C{budget_grants} row per budget, window and holder (one
process) records what it was granted and what it reported spent. Grants
are handed out in one transaction that holds the budget's lock (SQLite's
C{BEGIN IMMEDIATE}; on PostgreSQL an advisory lock per budget, so
collectors sharing one database hand out one budget's slices in turn), so
the sum of all grants of a window never passes the limit, and no process
spends past its grant: together they never pass the limit. The spend
recorded before the first grant of a window is a row of its own
(C{_recorded}).

When a budget's limit is lowered below what its holders were granted,
each holder's next exchange shrinks its grant to what it spent and holds
plus a slice, within the room the others leave (their grants shrink at
their own next exchange).

A holder that has not reported for C{dead_after} seconds is taken for
gone: its grant shrinks to what it reported spent, and the rest goes back
to the others (what it spent after its last report, at most the worst
cases it had in flight then, is the bound on overshoot; see
C{docs/BUDGETS.md}).

Rate limits share the table (L{GrantBook.exchange_rate}): a slice of a
UTC minute's calls or tokens, in rows whose window is C{rate:MINUTE}.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from typing import Final

from llmobserve.collector._budgets import Budget
from llmobserve.collector._limits import RateLimit
from llmobserve.collector._sql import SqlConnection, as_sql

__all__ = ["NANO", "GrantBook"]

#: amounts in grants are whole nano-dollars, as in the proxy's ledger
NANO: Final = 1_000_000_000
_RECORDED: Final = "_recorded"
#: the window of a rate limit's rows: C{rate:} and its minute's start
_RATE: Final = "rate:"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS budget_grants (
    budget TEXT NOT NULL,
    "window" TEXT NOT NULL,
    holder TEXT NOT NULL,
    granted INTEGER NOT NULL,
    spent INTEGER NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (budget, "window", holder)
)
"""


def _rate_key(minute: float) -> str:
    return f"{_RATE}{minute!r}"


class GrantBook:
    """The C{budget_grants} table of a store (one thread at a time): a
    SQLite file's (created here) or a PostgreSQL database's (migrations)."""

    def __init__(self, db: sqlite3.Connection | SqlConnection, *, dead_after: float = 30.0) -> None:
        self._db = as_sql(db)
        self._dead_after = dead_after
        if self._db.dialect == "sqlite":
            self._db.execute(_SCHEMA)

    def exchange(
        self,
        budget: Budget,
        window_start: float,
        holder: str,
        *,
        spent: int,
        busy: int,
        now: float,
        recorded: Callable[[], float],
    ) -> int:
        """Report this holder's C{spent} (and C{busy}: spent + in flight),
        take back grants of holders gone quiet, and top this holder's grant
        up to a slice of free room. Returns its grant (nano-USD).

        @param recorded: the store's spend in the window in USD, read only
            for the window's first grant.
        """
        limit = math.floor(budget.limit_usd * NANO + 1e-6)
        return self._exchange(
            budget.name,
            repr(window_start),
            limit,
            holder,
            spent=spent,
            busy=busy,
            now=now,
            recorded=lambda: round(recorded() * NANO),
        )

    def exchange_rate(
        self,
        limit: RateLimit,
        minute: float,
        holder: str,
        *,
        used: int,
        busy: int,
        now: float,
        recorded: Callable[[], int],
        want: int = 0,
    ) -> int:
        """L{exchange} for a rate limit's UTC minute starting at C{minute}
        (calls or tokens instead of nano-USD). Its rows have the window
        C{rate:MINUTE}, which no budget window is, and a window's first
        grant drops the limit's rows of minutes that are over.

        @param recorded: the store's count in that minute, read only for
            its first grant.
        @param want: the tokens of a call this holder refused for want of
            room: its free grant is topped up to that much if the limit has
            it, even when that is more than a slice (a call's worst case
            can be bigger than a quarter of a tokens limit).
        """
        key = _rate_key(minute)

        def first() -> int:
            # minutes over by more than one are done with: their rows go
            # (the minute before, this one and the next stay)
            self._db.execute(
                'DELETE FROM budget_grants WHERE budget = ? AND "window" LIKE ?'
                ' AND "window" NOT IN (?, ?, ?)',
                (limit.name, f"{_RATE}%", *(_rate_key(minute + d) for d in (-60.0, 0.0, 60.0))),
            )
            return recorded()

        return self._exchange(
            limit.name,
            key,
            limit.per_minute,
            holder,
            spent=used,
            busy=busy,
            now=now,
            recorded=first,
            lock=f"{_RATE}{limit.name}",
            want=want,
        )

    def _exchange(
        self,
        name: str,
        key: str,
        limit: int,
        holder: str,
        *,
        spent: int,
        busy: int,
        now: float,
        recorded: Callable[[], int],
        lock: str | None = None,
        want: int = 0,
    ) -> int:
        db = self._db
        with db.transaction(lock=lock or name):
            rows = db.execute(
                "SELECT holder, granted, spent, seen FROM budget_grants"
                ' WHERE budget = ? AND "window" = ?',
                (name, key),
            ).fetchall()
            if not rows:
                before = recorded()
                db.execute(
                    "INSERT INTO budget_grants VALUES (?, ?, ?, ?, ?, ?)",
                    (name, key, _RECORDED, before, before, math.inf),
                )
                rows = [(_RECORDED, before, before, math.inf)]
            others = 0
            alive = 1
            mine = 0
            for who, granted, was_spent, seen in rows:
                if who == holder:
                    mine = granted
                    continue
                if who != _RECORDED and seen < now - self._dead_after:
                    if granted > was_spent:
                        db.execute(
                            "UPDATE budget_grants SET granted = spent"
                            ' WHERE budget = ? AND "window" = ? AND holder = ?',
                            (name, key, who),
                        )
                    granted = was_spent
                elif who != _RECORDED:
                    alive += 1
                others += granted
            # spend past the grant (a fail-open budget during an outage) is
            # spend all the same: the grant grows to cover it
            mine = max(mine, spent)
            # a slice, or room for the call this holder could not take
            share = max(limit // (4 * alive), want, 1)
            if others + mine > limit:
                # the limit was lowered below what is granted: this holder
                # keeps what it spent and holds, plus at most a slice of the
                # room left (a grant of the old limit let each holder spend
                # up to the new one)
                mine = max(spent, min(limit - others, busy + share))
            free = mine - busy
            if free < share:
                mine += max(0, min(share - free, limit - others - mine))
            db.execute(
                "INSERT INTO budget_grants VALUES (?, ?, ?, ?, ?, ?)"
                ' ON CONFLICT (budget, "window", holder) DO UPDATE SET'
                " granted = excluded.granted, spent = excluded.spent, seen = excluded.seen",
                (name, key, holder, mine, spent, now),
            )
        return int(mine)

    def release(self, budget: Budget, window_start: float, holder: str, busy: int) -> None:
        """Give back what this holder was granted beyond C{busy} (stopping)."""
        self._release(budget.name, repr(window_start), holder, busy)

    def release_rate(self, limit: RateLimit, minute: float, holder: str, busy: int) -> None:
        """L{release} for a rate limit's minute."""
        self._release(limit.name, _rate_key(minute), holder, busy)

    def _release(self, name: str, key: str, holder: str, busy: int) -> None:
        self._db.execute(
            "UPDATE budget_grants SET"
            " granted = CASE WHEN granted < ? THEN granted ELSE ? END,"
            " spent = CASE WHEN granted < ? THEN granted ELSE ? END"
            ' WHERE budget = ? AND "window" = ? AND holder = ?',
            (busy, busy, busy, busy, name, key, holder),
        )
