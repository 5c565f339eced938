"""Budgets enforced in the proxy: reserve a call's worst case, settle its cost.

L{BudgetLedger} holds, for each budget, the spend settled in its current
window and the reservations of the calls in flight. It is touched on the
reactor thread only, so a check and its reservation are one step that no
other call can interleave with: with one process, spend never passes a
C{block} budget's limit (see C{docs/BUDGETS.md}).

 - L{BudgetLedger.reserve}: before a call goes upstream. Refused (a
   L{BudgetRefusal}) when its worst case could take a C{block} budget past
   its limit; else a L{BudgetHold} that the relay puts on the transaction.
 - L{BudgetHold.settle}: when the parse pool has priced the call (back on
   the reactor): the hold becomes the real cost, the rest is released.
 - L{BudgetLedger.load}: the definitions and the spend so far, from the
   store (at start-up, then every second by L{BudgetPoller}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from llmobserve.collector import Budget, SQLiteBudgetBook
from llmobserve.money import usd_fixed
from parsers import worst_case

__all__ = [
    "BudgetHold",
    "BudgetLedger",
    "BudgetPoller",
    "BudgetRefusal",
    "CallScope",
    "check_call",
    "remaining_value",
]

_log = Logger()

#: the header of an allowed call: USD left in the tightest budget of its scope
REMAINING_HEADER: Final = b"X-LLMObserve-Budget-Remaining"

#: outcomes of calls that never reached the upstream: nothing was spent
_NOT_SENT: Final = frozenset({"refused", "proxy_error", "budget_refused"})


class CallScope(NamedTuple):
    """The labels of one call that budget scopes test (a named tuple: it is
    made for every budgeted call and is the key of the ledger's scope cache)."""

    provider: str | None
    model: str | None
    customer: str | None = None
    tenant: str | None = None
    section_path: str | None = None


#: Amounts are kept in whole nano-dollars: float sums drift (a hundred
#: $0.01 calls add up to more than $1.00), integers do not. Reservations
#: round up, limits down.
_NANO: Final = 1_000_000_000


def _nano_up(usd: float) -> int:
    return math.ceil(usd * _NANO - 1e-6)


def _nano(usd: float) -> int:
    return round(usd * _NANO)


@attrs.define(eq=False)
class _Account:
    """One budget's live state in its current window (amounts in nano-USD)."""

    budget: Budget
    window_start: float
    window_end: float
    spent: int = 0  # settled (and, at load, recorded in the store) in this window
    reserved: int = 0  # worst cases of the calls in flight
    live: bool = True  # False once the budget is deleted or redefined
    limit: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.limit = math.floor(self.budget.limit_usd * _NANO + 1e-6)

    def roll(self, now: float) -> None:
        """Start the window holding C{now} when the current one has ended."""
        if now >= self.window_end:
            self.window_start = self.budget.window_start(now)
            self.window_end = self.budget.window_end(now)
            self.spent = 0
            self.reserved = 0

    def refusal(self, worst: float | None, reason: str) -> BudgetRefusal:
        """Why this budget refuses a call of that worst case (None: unknown)."""
        if self.spent + self.reserved >= self.limit:
            reason = "it is spent"
        elif worst is not None:
            reason = f"{reason} ${usd_fixed(round(worst, 8))}"
        return BudgetRefusal(self.budget, self.spent / _NANO, self.reserved / _NANO, worst, reason)


@attrs.frozen
class BudgetRefusal:
    """Why a call is refused: the budget, its window, spend and limit."""

    budget: Budget
    spend_usd: float
    reserved_usd: float
    worst_case_usd: float | None
    reason: str

    def message(self) -> str:
        """The error message of the 402."""
        return (
            f"budget {self.budget.name!r} ({self.budget.window}) would be exceeded: "
            f"spend ${usd_fixed(round(self.spend_usd, 8))} + in flight "
            f"${usd_fixed(round(self.reserved_usd, 8))} of limit "
            f"${usd_fixed(self.budget.limit_usd)}; {self.reason}"
        )

    def detail(self) -> dict[str, Any]:
        """The C{budget} object of the 402's JSON body."""
        return {
            "name": self.budget.name,
            "window": self.budget.window,
            "tz": self.budget.tz,
            "spend_usd": self.spend_usd,
            "reserved_usd": self.reserved_usd,
            "limit_usd": self.budget.limit_usd,
            "worst_case_usd": self.worst_case_usd,
        }


class BudgetHold:
    """The reservation of one allowed call, settled once.

    @ivar remaining: USD left in the tightest budget once this call's worst
        case is reserved (the C{X-LLMObserve-Budget-Remaining} header).
    @ivar flags: added to the call's event (C{budget_unpriced},
        C{budget_warn:NAME}).
    """

    __slots__ = ("_amount", "_parts", "_settled", "flags", "remaining")

    def __init__(
        self,
        parts: list[tuple[_Account, float]],
        amount: int,
        remaining: float | None,
        flags: tuple[str, ...],
    ) -> None:
        self._parts = parts  # (account, its window start then)
        self._amount = amount  # held on each, nano-USD
        self._settled = False
        self.remaining = remaining
        self.flags = flags

    def settle(self, cost: float | None, outcome: str, status: int | None) -> None:
        """Turn the hold into the call's real cost and release the rest.

        With no price: a call that never reached the upstream, or that the
        upstream answered with an error status, spent nothing; any other
        keeps its worst case as spent (we cannot know less).
        """
        if self._settled:
            return
        self._settled = True
        amount = self._amount
        if cost is not None:
            spent = _nano(cost)
        elif outcome not in _NOT_SENT and not (status is not None and status >= 400):
            spent = amount
        else:
            spent = 0
        for account, window_start in self._parts:
            if account.live and account.window_start == window_start:
                # else: deleted, redefined, or its window is over
                account.reserved = max(account.reserved - amount, 0)
                account.spent += spent


class BudgetLedger:
    """Every budget's spend and reservations; reactor thread only.

    @param now: wall-clock time (unix seconds); windows roll over by it.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self._accounts: list[_Account] = []
        # the accounts each call scope counts against, until the next load
        self._matched: dict[CallScope, list[_Account]] = {}

    @property
    def active(self) -> bool:
        """Is any budget defined (else calls skip the check altogether)?"""
        return bool(self._accounts)

    def load(self, budgets: Sequence[Budget], spends: Mapping[str, float]) -> None:
        """Replace the definitions. A budget that counts the same calls over
        the same window as before keeps its live spend and reservations; a
        new one starts from the store's spend C{spends[name]}."""
        now = self.now()
        old = {a.budget.name: a for a in self._accounts}
        accounts = []
        for budget in budgets:
            prev = old.pop(budget.name, None)
            if prev is not None and prev.budget.counts_same(budget):
                prev.budget = budget
                prev.limit = math.floor(budget.limit_usd * _NANO + 1e-6)
                prev.roll(now)
                accounts.append(prev)
                continue
            if prev is not None:
                prev.live = False
            accounts.append(
                _Account(
                    budget,
                    budget.window_start(now),
                    budget.window_end(now),
                    spent=_nano(spends.get(budget.name, 0.0)),
                )
            )
        for gone in old.values():
            gone.live = False
        self._accounts = accounts
        self._matched = {}

    def reserve(self, scope: CallScope, worst: float | None) -> BudgetHold | BudgetRefusal:
        """Check the call against every budget of its scope, and reserve
        its worst case (C{None}: unknown) on each if none refuses it."""
        now = self.now()
        matched = self._matched.get(scope)
        if matched is None:
            matched = [
                a
                for a in self._accounts
                if a.budget.matches(
                    scope.provider, scope.model, scope.customer, scope.tenant, scope.section_path
                )
            ]
            if len(self._matched) >= 4096:  # labels come from clients: stay bounded
                self._matched.clear()
            self._matched[scope] = matched
        if not matched:
            return BudgetHold([], 0, None, ())
        amount = 0 if worst is None else _nano_up(worst)
        flags: tuple[str, ...] = ()
        for account in matched:
            if now >= account.window_end:
                account.roll(now)
            b = account.budget
            used = account.spent + account.reserved
            if worst is None:
                if b.action == "block" and (b.unpriced == "block" or used >= account.limit):
                    return account.refusal(None, "no price is known for this call")
            elif used + amount > account.limit:
                if b.action == "block":
                    return account.refusal(worst, "this call could cost up to")
                flags += (f"budget_warn:{b.name}",)
        if worst is None:
            flags += ("budget_unpriced",)
        parts = []
        left = None
        for account in matched:
            account.reserved += amount
            parts.append((account, account.window_start))
            rest = account.limit - account.spent - account.reserved
            if left is None or rest < left:
                left = rest
        return BudgetHold(parts, amount, None if left is None else left / _NANO, flags)


class BudgetPoller(Service):
    """Loads the budgets and their spend from the store at start-up, then
    every C{interval} seconds (in a thread of its own), into the ledger."""

    def __init__(
        self,
        reactor: IReactorTime,
        ledger: BudgetLedger,
        store_path: str,
        *,
        interval: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self.ledger = ledger
        self._path = store_path
        self._interval = interval
        self._book: SQLiteBudgetBook | None = None
        self._known: tuple[Budget, ...] | None = None
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="llmobserve-budgets")
        self._loop: LoopingCall | None = None

    def load_now(self) -> None:
        """Load once, synchronously (start-up: a restart never resets a budget)."""
        self._apply(self._read())

    def _read(self) -> tuple[tuple[Budget, ...], dict[str, float]]:
        if self._book is None:
            self._book = SQLiteBudgetBook(self._path)
        budgets = tuple(self._book.list())
        known = self._known or ()
        fresh = [
            b for b in budgets if not any(k.name == b.name and k.counts_same(b) for k in known)
        ]
        now = self.ledger.now()
        return budgets, {b.name: self._book.spend(b, now) for b in fresh}

    def _apply(self, result: tuple[tuple[Budget, ...], dict[str, float]]) -> None:
        budgets, spends = result
        if budgets != self._known:
            self.ledger.load(budgets, spends)
            self._known = budgets

    def _poll(self) -> Any:
        d = deferToThreadPool(self._reactor, self._pool, self._read)  # type: ignore[arg-type]
        d.addCallback(self._apply)
        d.addErrback(lambda f: _log.failure("reading budgets failed", f))
        return d

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._pool.start()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._pool.stop()
        if self._book is not None:
            self._book.close()
            self._book = None
        return None


def check_call(
    ledger: BudgetLedger,
    *,
    provider_hint: str | None,
    host: str,
    path: str,
    context: Any,
    body: bytes | None,
    body_bytes: int,
) -> BudgetHold | BudgetRefusal:
    """Bound the call's cost from its body and reserve it (reactor thread).

    @param context: the call's L{llmobserve.transaction.Context}.
    @param body: the whole request body, or None when it was too big to hold.
    """
    bound = worst_case(provider_hint, host, path, body, body_bytes, ledger.now())
    scope = CallScope(
        bound.provider,
        bound.model,
        context.customer_id,
        context.tenant_id,
        context.section_path or context.section,
    )
    return ledger.reserve(scope, bound.cost_usd)


def remaining_value(remaining: float) -> bytes:
    """The C{X-LLMObserve-Budget-Remaining} value: USD in fixed notation,
    to the micro-dollar (rounded down), never negative."""
    micro = math.floor(max(remaining, 0.0) * 1_000_000 + 1e-6)
    text = f"{micro // 1_000_000}.{micro % 1_000_000:06d}".rstrip("0").rstrip(".")
    return text.encode()
