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
gone, but its whole grant stays counted until the window ends: it may
have spent all of it after its last report (during a collector outage,
say) with its events still in its spool. And every exchange checks the
reports against the events: what the others hold counts as at least the
store's spend in the window (the events' C{cost_usd}, read at most once a
second per budget) less this holder's reported spend, plus what the live
others were granted and have not reported spent. So the events of a dead
holder's spool, stored late, of a fail-open holder that spent past its
grant, or of calls from before the window's first grant, shrink what is
granted next; they never take back what a holder was granted (only a
lowered limit does): its calls admitted while its exchange is on its way
would be spent on room granted to the others. See C{docs/BUDGETS.md}.

A holder refused a call bigger than its free grant says so (C{want}): its
grant is topped up to that much if the limit has it, even when that is
more than a slice.

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

__all__ = ["NANO", "GrantBook", "SpendCache"]

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


class SpendCache:
    """Each budget's spend in a window as the events show it (nano-USD),
    read at most once per C{ttl} seconds: every holder exchanges every
    second, and the sum runs over the window's events."""

    def __init__(self, ttl: float = 1.0) -> None:
        self._ttl = ttl
        self._read: dict[tuple[str, str], tuple[float, int]] = {}

    def get(self, name: str, window: str, now: float, read: Callable[[], float]) -> int:
        """The spend (USD from C{read}, in nano-USD), read again when older than C{ttl}."""
        cached = self._read.get((name, window))
        if cached is not None and 0 <= now - cached[0] < self._ttl:
            return cached[1]
        value = round(read() * NANO)
        if len(self._read) >= 1024:  # budgets come and go: stay bounded
            self._read.clear()
        self._read[(name, window)] = (now, value)
        return value

    def last(self, name: str, window: str) -> int | None:
        """The spend last read for that budget and window (nano-USD), or None."""
        cached = self._read.get((name, window))
        return None if cached is None else cached[1]


class GrantBook:
    """The C{budget_grants} table of a store (one thread at a time): a
    SQLite file's (created here) or a PostgreSQL database's (migrations)."""

    def __init__(
        self,
        db: sqlite3.Connection | SqlConnection,
        *,
        dead_after: float = 30.0,
        spends: SpendCache | None = None,
    ) -> None:
        """
        @param spends: the budgets' spend read from the events, kept for a
            second; pass one to share it between books made per request.
        """
        self._db = as_sql(db)
        self._dead_after = dead_after
        self._spends = SpendCache() if spends is None else spends
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
        want: int = 0,
        cap: int | None = None,
    ) -> int:
        """Report this holder's C{spent} (and C{busy}: spent + in flight)
        and top its grant up to a slice of the free room. Returns its grant
        (nano-USD).

        @param recorded: the store's spend in the window in USD (summed from
            its events): the window's first grant counts it as spent, and
            every exchange holds the grants to it (read at most once a
            second per budget and window).
        @param want: the most a call this holder refused for want of grant
            could cost (nano-USD): its free grant is topped up to that if
            the limit has it, even when that is more than a slice.
        @param cap: what the holder may spend now (its grant within the
            limit): it admits calls up to it until it has applied the
            grant returned, so a grant that shrinks is recorded as no less
            than this until the holder's next exchange reports the new one
            (None: a holder that does not say; the grant returned is kept).
        """
        limit = math.floor(budget.limit_usd * NANO + 1e-6)
        key = repr(window_start)

        def events() -> int:
            return self._spends.get(budget.name, key, now, recorded)

        return self._exchange(
            budget.name,
            key,
            limit,
            holder,
            spent=spent,
            busy=busy,
            now=now,
            recorded=events,
            events=events,
            want=want,
            cap=cap,
        )

    def recorded(self, budget: Budget, window_start: float) -> int | None:
        """The budget's spend in that window as the events showed it at the
        last exchange (every holder's; nano-USD), or None if none read it."""
        return self._spends.last(budget.name, repr(window_start))

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
        events: Callable[[], int] | None = None,
        cap: int | None = None,
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
            others = 0  # what the others hold (a silent holder: all it was granted)
            unreported = 0  # what the live others hold and have not reported spent
            alive = 1
            mine = 0
            for who, granted, was_spent, seen in rows:
                if who == holder:
                    mine = granted
                    continue
                if who != _RECORDED and seen >= now - self._dead_after:
                    alive += 1
                    unreported += max(0, granted - was_spent)
                others += granted
            others_granted = others  # with the spend recorded before the first grant
            if events is not None:
                # the events may show more spent than the grants hold: a
                # silent holder's past its grant (fail open), calls stored
                # late from before the first grant. (A live holder's calls
                # stored since its last report count twice here: this only
                # ever limits what is granted next, never what was.)
                others = max(others, events() - spent + unreported)
            # spend past the grant (a fail-open budget during an outage) is
            # spend all the same: the grant grows to cover it
            mine = max(mine, spent)
            # a slice, or room for the call this holder could not take
            share = max(limit // (4 * alive), want, 1)
            if others_granted + mine > limit:
                # the limit was lowered below what is granted: this holder
                # keeps what it spent and holds, plus at most a slice of the
                # room left (a grant of the old limit let each holder spend
                # up to the new one). Only a lowered limit takes a grant
                # back: a holder admits calls on its grant while this
                # exchange is on its way, and its calls in flight are
                # spent whatever the row says (a grant shrunk by the
                # events' estimate let the others take room those calls
                # held: $1.0725 recorded on $1.00 by two collectors)
                mine = max(busy, min(limit - others, busy + share))
            free = mine - busy
            if free < share:
                mine += max(0, min(share - free, limit - others - mine))
            # what the holder may spend until it applies this grant: its
            # cap now, when that is more (a grant that shrank)
            kept = mine if cap is None or cap <= mine else cap
            db.execute(
                "INSERT INTO budget_grants VALUES (?, ?, ?, ?, ?, ?)"
                ' ON CONFLICT (budget, "window", holder) DO UPDATE SET'
                " granted = excluded.granted, spent = excluded.spent, seen = excluded.seen",
                (name, key, holder, kept, spent, now),
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
