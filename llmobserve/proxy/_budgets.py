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
   store (at start-up, then every second by C{_budgetpoll.BudgetPoller}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import attrs

from llmobserve.collector import Budget, RateLimit
from llmobserve.money import usd_fixed
from parsers import worst_case

__all__ = [
    "BudgetHold",
    "BudgetLedger",
    "BudgetRefusal",
    "CallScope",
    "RateRefusal",
    "check_call",
    "remaining_value",
]


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
    #: shared budgets: what the store granted this process in this window
    #: (None: the whole limit is this process's)
    granted: int | None = None
    limit: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.limit = math.floor(self.budget.limit_usd * _NANO + 1e-6)

    @property
    def cap(self) -> int:
        """What this process may spend: the limit, or its grant when shared."""
        granted = self.granted
        return self.limit if granted is None or granted > self.limit else granted

    def roll(self, now: float) -> None:
        """Start the window holding C{now} when the current one has ended."""
        if now >= self.window_end:
            self.window_start = self.budget.window_start(now)
            self.window_end = self.budget.window_end(now)
            self.spent = 0
            self.reserved = 0
            if self.granted is not None:
                self.granted = 0  # a new window: nothing granted yet

    def refusal(self, worst: float | None, reason: str) -> BudgetRefusal:
        """Why this budget refuses a call of that worst case (None: unknown)."""
        cap = self.cap
        if self.spent + self.reserved >= cap:
            reason = "it is spent" if self.granted is None else "this process's share is spent"
        elif worst is not None:
            reason = f"{reason} ${usd_fixed(round(worst, 8))}"
        # shared: the spend is this process's, held against the share it was
        # granted, not against the limit (a refusal at 15 % of the limit read
        # "spend $0 + in flight $0.0004626 of limit $0.003")
        share = cap / _NANO if self.granted is not None and cap < self.limit else None
        return BudgetRefusal(
            self.budget, self.spent / _NANO, self.reserved / _NANO, worst, reason, share_usd=share
        )


@attrs.frozen
class BudgetRefusal:
    """Why a call is refused: the budget, its window, spend and limit."""

    budget: Budget
    spend_usd: float
    reserved_usd: float
    worst_case_usd: float | None
    reason: str
    #: shared budgets: what the store granted this process (its spend and
    #: in-flight figures are its own); None when the limit itself refused
    share_usd: float | None = None
    status: int = 402
    kind: str = "budget_exceeded"
    detail_key: str = "budget"
    retry_after: int | None = None

    def message(self) -> str:
        """The error message of the 402."""
        spend = usd_fixed(round(self.spend_usd, 8))
        reserved = usd_fixed(round(self.reserved_usd, 8))
        limit = usd_fixed(self.budget.limit_usd)
        if self.share_usd is None:
            held = f"spend ${spend} + in flight ${reserved} of limit ${limit}"
        else:
            held = (
                f"this process's spend ${spend} + in flight ${reserved} of its share"
                f" ${usd_fixed(round(self.share_usd, 8))} (limit ${limit}, shared with other"
                " processes: the store grants more within a second while the limit allows)"
            )
        return (
            f"budget {self.budget.name!r} ({self.budget.window}) would be exceeded: "
            f"{held}; {self.reason}"
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
            **({} if self.share_usd is None else {"share_usd": self.share_usd}),
        }


@attrs.define(eq=False)
class _RateAccount:
    """One rate limit's count in the current UTC minute (calls or tokens)."""

    rule: RateLimit
    window_start: float
    window_end: float
    used: int = 0  # settled in this minute
    reserved: int = 0  # held by the calls in flight
    live: bool = True

    def roll(self, now: float) -> None:
        """Start the minute holding C{now} when the current one has ended."""
        if now >= self.window_end:
            self.window_start = self.rule.window_start(now)
            self.window_end = self.window_start + 60.0
            self.used = 0
            self.reserved = 0


@attrs.frozen
class RateRefusal:
    """A call refused by a rate limit: 429, retry after the minute ends."""

    rule: RateLimit
    used: int
    reserved: int
    wanted: int | None
    retry_after: int
    status: int = 429
    kind: str = "rate_limited"
    detail_key: str = "limit"

    def message(self) -> str:
        """The error message of the 429."""
        wanted = "" if self.wanted is None else f"; this call needs up to {self.wanted}"
        return (
            f"rate limit {self.rule.name!r} ({self.rule.per_minute} {self.rule.unit} per"
            f" minute) reached: {self.used} used + {self.reserved} in flight{wanted}"
        )

    def detail(self) -> dict[str, Any]:
        """The C{limit} object of the 429's JSON body."""
        return {
            "name": self.rule.name,
            "unit": self.rule.unit,
            "per_minute": self.rule.per_minute,
            "used": self.used,
            "reserved": self.reserved,
            "retry_after_s": self.retry_after,
        }


class BudgetHold:
    """The reservation of one allowed call, settled once.

    @ivar remaining: USD left in the tightest budget once this call's worst
        case is reserved (the C{X-LLMObserve-Budget-Remaining} header).
    @ivar flags: added to the call's event (C{budget_unpriced},
        C{budget_warn:NAME}).
    """

    __slots__ = ("_amount", "_parts", "_rates", "_settled", "flags", "remaining")

    def __init__(
        self,
        parts: list[tuple[_Account, float]],
        amount: int,
        remaining: float | None,
        flags: tuple[str, ...],
        rates: list[tuple[_RateAccount, float, int]] | None = None,
    ) -> None:
        self._parts = parts  # (account, its window start then)
        self._amount = amount  # held on each, nano-USD
        self._rates = rates  # (rate account, its minute then, calls or tokens held)
        self._settled = False
        self.remaining = remaining
        self.flags = flags

    def settle(
        self, cost: float | None, outcome: str, status: int | None, tokens: int | None = None
    ) -> None:
        """Turn the hold into the call's real cost (and tokens) and release the rest.

        With no price: a call that never reached the upstream, or that the
        upstream answered with an error status, spent nothing; any other
        keeps its worst case as spent (we cannot know less). Tokens
        likewise; a call counts against a calls limit once it was sent.
        """
        if self._settled:
            return
        self._settled = True
        amount = self._amount
        spared = outcome in _NOT_SENT or (status is not None and status >= 400)
        if cost is not None:
            spent = _nano(cost)
        elif not spared:
            spent = amount
        else:
            spent = 0
        for account, window_start in self._parts:
            if account.live and account.window_start == window_start:
                # else: deleted, redefined, or its window is over
                account.reserved = max(account.reserved - amount, 0)
                account.spent += spent
        if self._rates:
            for rate, minute, held in self._rates:
                if rate.live and rate.window_start == minute:
                    rate.reserved = max(rate.reserved - held, 0)
                    if rate.rule.unit == "calls":
                        rate.used += 0 if outcome in _NOT_SENT else 1
                    elif tokens is not None:
                        rate.used += tokens
                    elif not spared:
                        rate.used += held


class BudgetLedger:
    """Every budget's spend and reservations; reactor thread only.

    @param now: wall-clock time (unix seconds); windows roll over by it.
    """

    def __init__(self, now: Callable[[], float], *, shared: bool = False) -> None:
        self.now = now
        #: several processes enforce these budgets: each spends only its grant
        self.shared = shared
        #: called when a shared budget's grant runs low (ask the store for more)
        self.on_low: Callable[[], None] | None = None
        #: the collector cannot be reached: budgets with fail=open let calls through
        self.outage = False
        self._accounts: list[_Account] = []
        self._rates: list[_RateAccount] = []
        # the accounts each call scope counts against, until the next load
        self._matched: dict[CallScope, list[_Account]] = {}
        self._matched_rates: dict[CallScope, list[_RateAccount]] = {}

    @property
    def active(self) -> bool:
        """Is any budget or rate limit defined (else calls skip the check)?"""
        return bool(self._accounts or self._rates)

    def load_limits(
        self, limits: Sequence[RateLimit], used: Mapping[str, int] | None = None
    ) -> None:
        """Replace the rate limits; one that counts the same keeps its minute,
        a new one starts from what the store recorded in it (C{used[name]})."""
        now = self.now()
        old = {a.rule.name: a for a in self._rates}
        rates = []
        for rule in limits:
            prev = old.pop(rule.name, None)
            if prev is not None and prev.rule.counts_same(rule):
                prev.rule = rule
                prev.roll(now)
                rates.append(prev)
                continue
            if prev is not None:
                prev.live = False
            start = rule.window_start(now)
            rates.append(_RateAccount(rule, start, start + 60.0, (used or {}).get(rule.name, 0)))
        for gone in old.values():
            gone.live = False
        self._rates = rates
        self._matched_rates = {}

    def _check_rates(
        self, scope: CallScope, tokens: int | None
    ) -> list[tuple[_RateAccount, float, int]] | RateRefusal | None:
        matched = self._matched_rates.get(scope)
        if matched is None:
            matched = [
                a
                for a in self._rates
                if a.rule.matches(
                    scope.provider, scope.model, scope.customer, scope.tenant, scope.section_path
                )
            ]
            if len(self._matched_rates) >= 4096:
                self._matched_rates.clear()
            self._matched_rates[scope] = matched
        if not matched:
            return None
        now = self.now()
        wants = []
        for rate in matched:
            if now >= rate.window_end:
                rate.roll(now)
            want = 1 if rate.rule.unit == "calls" else tokens
            busy = rate.used + rate.reserved
            if (want is None and busy >= rate.rule.per_minute) or (
                want is not None and busy + want > rate.rule.per_minute
            ):
                wait = max(1, math.ceil(rate.window_end - now))
                return RateRefusal(rate.rule, rate.used, rate.reserved, want, wait)
            wants.append(want or 0)
        held = []
        for rate, want in zip(matched, wants, strict=True):
            rate.reserved += want
            held.append((rate, rate.window_start, want))
        return held

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
            shared = self.shared and budget.action == "block"
            accounts.append(
                _Account(
                    budget,
                    budget.window_start(now),
                    budget.window_end(now),
                    # shared: this process's own spend, the rest is in the grants
                    spent=0 if shared else _nano(spends.get(budget.name, 0.0)),
                    granted=0 if shared else None,
                )
            )
        for gone in old.values():
            gone.live = False
        self._accounts = accounts
        self._matched = {}

    def reserve(
        self, scope: CallScope, worst: float | None, tokens: int | None = None
    ) -> BudgetHold | BudgetRefusal | RateRefusal:
        """Check the call against every budget and rate limit of its scope,
        and reserve its worst case (C{None}: unknown; C{tokens}: its most
        input + output tokens) on each if none refuses it."""
        rates = None
        if self._rates:
            checked = self._check_rates(scope, tokens)
            if isinstance(checked, RateRefusal):
                return checked
            rates = checked
        hold = self._reserve_budgets(scope, worst)
        if rates:
            if isinstance(hold, BudgetRefusal):
                for rate, _, want in rates:
                    rate.reserved -= want
                return hold
            hold._rates = rates
            if tokens is None and any(r.rule.unit == "tokens" for r, _, _ in rates):
                hold.flags += ("rate_unbounded",)
        return hold

    def _reserve_budgets(self, scope: CallScope, worst: float | None) -> BudgetHold | BudgetRefusal:
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
            cap = account.cap
            if self.outage and b.fail == "open" and account.granted is not None:
                flags += ("budget_fail_open",)
                continue
            if worst is None:
                if b.action == "block" and (b.unpriced == "block" or used >= cap):
                    return self._refused(account, None, "no price is known for this call")
            elif used + amount > cap:
                if b.action == "block":
                    return self._refused(account, worst, "this call could cost up to")
                flags += (f"budget_warn:{b.name}",)
        if worst is None:
            flags += ("budget_unpriced",)
        parts = []
        left = None
        for account in matched:
            account.reserved += amount
            parts.append((account, account.window_start))
            rest = account.cap - account.spent - account.reserved
            if left is None or rest < left:
                left = rest
        if self.shared and left is not None and left < 4 * max(amount, 1) and self.on_low:
            self.on_low()  # fewer than four more calls like this one fit: ask now
        return BudgetHold(parts, amount, None if left is None else left / _NANO, flags)

    def _refused(self, account: _Account, worst: float | None, reason: str) -> BudgetRefusal:
        if account.granted is not None and self.on_low is not None:
            self.on_low()  # the store may grant more for the next call
        return account.refusal(worst, reason)

    def grant_snapshot(self) -> dict[str, tuple[float, int, int]]:
        """Shared budgets: name -> (window start, spent, spent + in flight)."""
        return {
            a.budget.name: (a.window_start, a.spent, a.spent + a.reserved)
            for a in self._accounts
            if a.granted is not None
        }

    def set_grants(self, grants: Mapping[str, tuple[float, int]]) -> None:
        """Shared budgets: what the store granted, by name (window start, nano-USD)."""
        for account in self._accounts:
            got = grants.get(account.budget.name)
            if got is not None and account.granted is not None:
                if got[0] == account.window_start:
                    account.granted = got[1]


def check_call(
    ledger: BudgetLedger,
    *,
    provider_hint: str | None,
    host: str,
    path: str,
    context: Any,
    body: bytes | None,
    body_bytes: int,
) -> BudgetHold | BudgetRefusal | RateRefusal:
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
    tokens = None
    if bound.input_tokens is not None and bound.output_tokens is not None:
        tokens = bound.input_tokens + bound.output_tokens
    return ledger.reserve(scope, bound.cost_usd, tokens)


def remaining_value(remaining: float) -> bytes:
    """The C{X-LLMObserve-Budget-Remaining} value: USD in fixed notation with
    six decimals (C{0.994500}), rounded down, never negative."""
    return b"%.6f" % (math.floor(max(remaining, 0.0) * 1_000_000 + 1e-6) / 1_000_000)
