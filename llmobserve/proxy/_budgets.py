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
from math import ceil
from typing import TYPE_CHECKING, Final, NamedTuple

import attrs
import msgspec

from llmobserve.collector import Budget, RateLimit, scope_matches
from llmobserve.money import NANO_PER_USD, nano_up, usd_fixed
from llmobserve.proxy._refusals import BudgetRefusal, RateRefusal

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = [
    "BudgetHold",
    "BudgetLedger",
    "BudgetRefusal",
    "CallScope",
    "RateRefusal",
    "ScopeKey",
]


#: the header of an allowed call: USD left in the tightest budget of its scope
REMAINING_HEADER: Final = b"X-LLMObserve-Budget-Remaining"

#: shared rate limits: a grant of the next minute is asked for once the
#: current one has less than this to run (seconds; the poller reads every one)
RATE_AHEAD: Final = 3.0

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
    #: the project of the key that authenticated the call (None: no key)
    project: str | None = None


#: Amounts are kept in whole nano-dollars: float sums drift (a hundred
#: $0.01 calls add up to more than $1.00), integers do not. Reservations
#: round up, limits down.
_NANO: Final = NANO_PER_USD


def _nano(usd: float) -> int:
    return round(usd * _NANO)


@attrs.define(eq=False)
class _Account:
    """One budget's live state in its current window (amounts in nano-USD).

    What is reserved (the worst cases of the calls in flight) is kept as
    L{free}, the room left: C{cap - spent - reserved}. A reservation reads
    and writes that one figure (a budget over $1 is a two-digit integer,
    and each sum of two makes a new one), and the reserved amount is
    worked out from it when a refusal or a grant report asks.
    """

    budget: Budget
    window_start: float
    window_end: float
    spent: int = 0  # settled (and, at load, recorded in the store) in this window
    live: bool = True  # False once the budget is deleted or redefined
    #: shared budgets: what the store granted this process in this window
    #: (None: the whole limit is this process's); see L{granted}
    _granted: int | None = None
    #: shared budgets: the most a call refused for want of grant could cost
    #: (asked for at the next exchange: it may be more than a slice)
    wanted: int = 0
    #: shared budgets: the whole budget's spend in this window as the store
    #: last reported it (every process's; None: not reported), for a
    #: refusal to say the budget itself is spent rather than this process's share
    recorded: int | None = None
    limit: int = attrs.field(init=False)
    #: What this process may spend: the limit, or its grant when shared. A
    #: field, not a property: every call reads it, and it changes only with
    #: the limit or the grant (L{set_limit}, L{granted}).
    cap: int = attrs.field(init=False)
    #: the room left: C{cap - spent - reserved} (negative once past the cap).
    #: While allotments are out it leaves out the room they took, and
    #: C{spent} what their calls spent: read an account's figures through
    #: L{BudgetLedger.accounts}, which gives them back first.
    free: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.limit = math.floor(self.budget.limit_usd * _NANO + 1e-6)
        self.cap = self._capped()
        self.free = self.cap - self.spent  # nothing reserved yet

    @property
    def reserved(self) -> int:
        """The worst cases of the calls in flight."""
        return self.cap - self.spent - self.free

    def set_limit(self, usd: float) -> None:
        """The budget's limit (rounded down to whole nano-USD)."""
        self.limit = math.floor(usd * _NANO + 1e-6)
        self._recap()

    @property
    def granted(self) -> int | None:
        """Shared budgets: what the store granted this process (None: not shared)."""
        return self._granted

    @granted.setter
    def granted(self, value: int | None) -> None:
        self._granted = value
        self._recap()

    def _capped(self) -> int:
        granted, limit = self._granted, self.limit
        return limit if granted is None or granted > limit else granted

    def _recap(self) -> None:
        """A new cap; what is spent and reserved stays."""
        cap = self._capped()
        self.free += cap - self.cap
        self.cap = cap

    def roll(self, now: float) -> None:
        """Start the window holding C{now} when the current one has ended."""
        if now >= self.window_end:
            self.window_start = self.budget.window_start(now)
            self.window_end = self.budget.window_end(now)
            self.spent = 0
            self.free = self.cap  # nothing reserved
            self.recorded = None
            if self.granted is not None:
                self.granted = 0  # a new window: nothing granted yet

    def refusal(self, worst: float | None, reason: str) -> BudgetRefusal:
        """Why this budget refuses a call of that worst case (None: unknown)."""
        recorded = self.recorded
        if self.granted is not None and recorded is not None and recorded >= self.limit:
            # shared, and the store says the whole budget is spent: say that,
            # not "this process's spend $0 of its share $0; its share is spent"
            # (in flight: this process's calls). The next exchange may bring a
            # raised limit, so the relay still waits for one.
            return BudgetRefusal(
                self.budget,
                recorded / _NANO,
                self.reserved / _NANO,
                worst,
                "it is spent",
                may_grant=True,
            )
        cap = self.cap
        if self.free <= 0:
            reason = "it is spent" if self.granted is None else "this process's share is spent"
        elif worst is not None:
            reason = f"{reason} ${usd_fixed(round(worst, 8))}"
        # shared: the spend is this process's, held against the share it was
        # granted, not against the limit (a refusal at 15 % of the limit read
        # "spend $0 + in flight $0.0004626 of limit $0.003")
        share = cap / _NANO if self.granted is not None and cap < self.limit else None
        return BudgetRefusal(
            self.budget,
            self.spent / _NANO,
            self.reserved / _NANO,
            worst,
            reason,
            share_usd=share,
            may_grant=share is not None,
        )


@attrs.define(eq=False)
class _RateAccount:
    """One rate limit's count in the current UTC minute (calls or tokens)."""

    rule: RateLimit
    window_start: float
    window_end: float
    used: int = 0  # settled in this minute (shared: by this process)
    reserved: int = 0  # held by the calls in flight
    live: bool = True
    #: shared limits: what the store or collector granted this process in
    #: this minute (None: the whole limit is this process's)
    granted: int | None = None
    #: shared limits: a grant of the next minute taken before it began
    #: (its start, the amount), this minute's grant once it begins
    ahead: tuple[float, int] | None = None
    #: shared limits: the most a call refused for want of grant needed
    #: (asked for at the next exchange, then forgotten)
    wanted: int = 0
    #: what this process may use in this minute: the limit, or its grant
    cap: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.recap()

    def recap(self) -> None:
        """Take the limit or the grant (after either changed)."""
        granted, limit = self.granted, self.rule.per_minute
        self.cap = limit if granted is None or granted > limit else granted

    def roll(self, now: float) -> None:
        """Start the minute holding C{now} when the current one has ended."""
        if now >= self.window_end:
            self.window_start = self.rule.window_start(now)
            self.window_end = self.window_start + 60.0
            self.used = 0
            self.reserved = 0
            if self.granted is not None:  # the grant taken ahead, if it is this minute's
                ahead = self.ahead
                self.granted = ahead[1] if ahead and ahead[0] == self.window_start else 0
                self.ahead = None
                self.recap()


def _usd_header(left: int) -> bytes:
    """C{left} nano-USD as the header's USD, rounded down to the micro-dollar
    and never negative (C{0.994500}).

    Below $1,000, from two tables of digits: formatting a float (or two
    integers) runs code that nothing else of a call runs, and costs a
    call's budget check about a twentieth more time in cache misses
    than the few instructions it takes (docs/BENCHMARKS.md, session 13).
    """
    if left < _TABLES_BELOW:
        if left < 0:
            return b"0.000000"
        micro = left // 1000
        return (
            _DOLLARS[micro // 1_000_000]
            + _THREE_DIGITS[micro // 1000 % 1000]
            + _THREE_DIGITS[micro % 1000]
        )
    return b"%d.%06d" % divmod(left // 1000, 1_000_000)


#: nano-USD below which L{_usd_header} reads its digits from tables ($1,000)
_TABLES_BELOW: Final = 1_000_000_000_000
#: C{b"0."} to C{b"999."}: the header's whole dollars, below $1,000
_DOLLARS: Final = tuple(b"%d." % n for n in range(1000))
#: C{b"000"} to C{b"999"}: three decimals of the header
_THREE_DIGITS: Final = tuple(b"%03d" % n for n in range(1000))


class BudgetHold(msgspec.Struct, gc=False, eq=False):
    """The reservation of one allowed call, settled once.

    Made by the ledger (L{of}; its common case inline). A C{msgspec.Struct}
    with no garbage-collector tracking (a hold is in no reference cycle):
    its constructor is C code, where a class's C{__init__} is one more
    Python call for every budgeted call.

    @ivar flags: added to the call's event (C{budget_unpriced},
        C{budget_warn:NAME}).
    @ivar header: the C{X-LLMObserve-Budget-Remaining} value (see
        L{remaining_header}), made with the hold: the relay reads it
        without a call of its own.
    """

    #: the scope's accounts then, and their windows
    _plan: _ScopePlan
    #: held on each, nano-USD
    _amount: int
    #: nano-USD left in the tightest budget once held
    _left: int | None
    flags: tuple[str, ...]
    header: bytes | None
    #: held on this allotment of them (None: on each account)
    _allotment: _Allotment | None = None
    _rates: list[tuple[_RateAccount, float, int]] | None = None
    _settled: bool = False

    @classmethod
    def of(
        cls,
        plan: _ScopePlan,
        amount: int,
        left: int | None,
        flags: tuple[str, ...] = (),
        allotment: _Allotment | None = None,
    ) -> BudgetHold:
        """The hold of C{amount} on C{plan} (on C{allotment}, when one),
        C{left} the least room its budgets have once it is held."""
        header = None if left is None else _usd_header(left)
        return cls(plan, amount, left, flags, header, allotment)

    @property
    def remaining(self) -> float | None:
        """USD left in the tightest budget of the call's scope once its worst
        case is held (None: no budget applies)."""
        left = self._left
        return None if left is None else left / _NANO

    def remaining_header(self) -> bytes | None:
        """The C{X-LLMObserve-Budget-Remaining} value: USD in fixed notation
        with six decimals (C{0.994500}), rounded down from whole nano-USD,
        never negative; None when no budget applies."""
        return self.header

    def settle(
        self,
        cost: float | None,
        outcome: str,
        status: int | None,
        usage: Mapping[str, object] | None = None,
    ) -> None:
        """Turn the hold into the call's real cost (and tokens: C{usage}, its
        event's, read only by a hold with tokens limits) and release the rest.

        With no price: a call that never reached the upstream, or that the
        upstream answered with an error status, spent nothing; any other
        keeps its worst case as spent (we cannot know less). Tokens
        likewise; a call counts against a calls limit once it was sent.
        """
        if self._settled:
            return
        self._settled = True
        amount = self._amount
        if cost is not None:
            # to the nearest nano-USD (a cost is never negative; int() and
            # a half is the quicker round() on a reactor that settles every
            # call, and 1e9 the quicker _NANO: 1.3k instructions less a settle)
            spent = int(cost * 1e9 + 0.5)
            if spent > amount and self._plan.ledger is not None:
                # more than was held (an unpriced call priced at its end, a
                # bound the price outran): room no allotment has counted is
                # gone, so they all go back before this is written
                self._plan.ledger.return_allotments()
        else:
            spared = outcome in _NOT_SENT or (status is not None and status >= 400)
            spent = 0 if spared else amount
        held_on = self._allotment
        if held_on is not None and held_on.live:
            # held on its plan's allotment, still taken from the accounts: the
            # rest goes back to the allotment, the spend is written with it
            # (an allotment's holds have no rate limits: its plan has none)
            held_on.avail += amount - spent
            held_on.spent += spent
            return
        plan = self._plan
        if plan.current:
            # no account of the plan has rolled or gone since the hold was
            # taken: each still holds this amount in the same window
            back = amount - spent
            for account in plan.accounts:
                account.free += back
                account.spent += spent
        else:
            for account, window_start in plan.parts:
                if account.window_start == window_start and account.live:
                    # else: deleted, redefined, or its window is over
                    left = account.reserved - amount
                    account.spent += spent
                    account.free = account.cap - account.spent - (left if left > 0 else 0)
        if self._rates:
            tokens = usage_tokens(usage)
            # tokens unknown: the ones held count, unless the call spent nothing
            spared = outcome in _NOT_SENT or (status is not None and status >= 400)
            for rate, minute, held in self._rates:
                if rate.live and rate.window_start == minute:
                    rate.reserved = max(rate.reserved - held, 0)
                    if rate.rule.unit == "calls":
                        rate.used += 0 if outcome in _NOT_SENT else 1
                    elif tokens is not None:
                        rate.used += tokens
                    elif not spared:
                        rate.used += held


def usage_tokens(usage: object) -> int | None:
    """The input + output tokens of an event's C{usage} (either count,
    when it has only one; None when it has neither)."""
    if not isinstance(usage, Mapping):
        return None
    counts = [v for k in ("input_tokens", "output_tokens") if type(v := usage.get(k)) is int]
    return sum(counts) if counts else None


#: A call's labels as the ledger keys them: L{CallScope}'s fields, in its order.
ScopeKey = tuple[str | None, str | None, str | None, str | None, str | None, str | None]


class _ScopePlan:
    """What one distinct call scope counts against, until the next load or
    the next window that ends: its budgets' accounts and rate limits, the
    (account, window start) pairs of its holds, and the earliest end of
    their windows (one comparison per call tells whether any must roll).

    A plan is never changed: it is I{current} until the ledger retires it
    (a load, or an account rolling to a new window), and while it is, no
    account of it has rolled or gone, so a hold taken on it settles
    without looking at each account's window (one flag per settle).
    """

    __slots__ = (
        "accounts",
        "allotment",
        "current",
        "ledger",
        "next_end",
        "parts",
        "plain",
        "rates",
    )

    def __init__(
        self,
        accounts: tuple[_Account, ...],
        rates: tuple[_RateAccount, ...],
        ledger: BudgetLedger | None = None,
    ) -> None:
        self.accounts = accounts
        #: its ledger: a hold that settles above its amount gives the
        #: allotments back through it (None: the plan of no budget)
        self.ledger = ledger
        self.rates = rates
        self.parts = tuple((a, a.window_start) for a in accounts)
        self.next_end = min((a.window_end for a in accounts), default=math.inf)
        self.current = True
        #: budgets and no rate limit: the one-pass reservation may apply
        self.plain = bool(accounts) and not rates
        #: the allotment of its accounts this plan's calls are held on (see L{_Allotment})
        self.allotment: _Allotment | None = None


#: the plan of the holds on no budget (a scope with rate limits only)
_NO_BUDGETS: Final = _ScopePlan((), ())

#: An allotment is room for this many calls like the one that took it ...
_ALLOT_CALLS: Final = 16
#: ... and at most this part of the room its accounts have left (so that
#: a few scopes in flight at once each find room for an allotment, and near a
#: limit, where no allotment fits a call, every call is held account by account)
_ALLOT_PART: Final = 8
#: All allotments out together take at most this part of the room (with
#: them): the X-LLMObserve-Budget-Remaining of a call leaves out what other
#: scopes' allotments hold, so it reads at most about this part less than is left.
_ALLOT_ALL_PART: Final = 4
#: allotments out at once, at most (the scopes past them are held account by account)
_MAX_ALLOTMENTS: Final = 64


class _Allotment:
    """Room taken at once from every account of one scope's plan, on which
    that scope's calls are then held and settled, one figure for all of
    its budgets, where each call would otherwise write each account twice.

    The room is taken from the accounts (their C{free} is lowered by it),
    so nothing is ever held twice: with allotments out, an account's C{free}
    is what is left outside them, and no call can take more than that. An
    allotment is given back (L{BudgetLedger.return_allotments}): what its
    calls did not hold returns to the accounts, and what they spent is
    written to them, before anything reads the accounts' figures (a
    refusal, a warn flag, a load, a window that rolls, a grant exchange, an
    outage) or a call settles above what it held.
    """

    __slots__ = ("avail", "base", "epoch", "live", "plan", "size", "spent")

    def __init__(self, plan: _ScopePlan, size: int) -> None:
        self.plan = plan
        #: the room taken from each account
        self.size = size
        #: the part of the allotment no call holds (nano-USD)
        self.avail = size
        #: what the calls held on it spent once settled, not yet in the accounts
        self.spent = 0
        #: the least room any of its accounts has outside the allotment (its
        #: calls' C{X-LLMObserve-Budget-Remaining} is this plus L{avail}),
        #: read when the ledger's C{room_epoch} was L{epoch}
        self.base = 0
        self.epoch = -1
        self.live = True

    def give_back(self) -> None:
        """Return what no call holds, and write what was spent, to the accounts."""
        self.live = False
        self.plan.allotment = None
        avail, spent = self.avail, self.spent
        for account in self.plan.accounts:
            account.free += avail
            account.spent += spent


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
        #: shared budgets: a Deferred that fires once the next grant exchange
        #: (asked for now) has ended, or failed, or taken too long: a call
        #: refused only by this process's share waits for it and is checked
        #: again, as the store may grant the room (the poller sets it)
        self.next_grants: Callable[[], Deferred[None]] | None = None
        #: refusals by a share so far: an exchange whose snapshot was taken
        #: at this count carries the wants of every one of them
        self.asks = 0
        self._outage = False
        self._accounts: list[_Account] = []
        self._rates: list[_RateAccount] = []
        #: each distinct call scope's accounts and rate limits, until the next load
        self._plans: dict[ScopeKey, _ScopePlan] = {}
        #: the allotments taken from the accounts (see L{_Allotment})
        self._allotments: set[_Allotment] = set()
        #: the room all allotments out took, together (L{_ALLOT_ALL_PART})
        self._set_aside = 0
        #: counts the times room was taken from the accounts other than by
        #: a call held on an allotment (an allotment taken, a call held
        #: budget by budget): each allotment reads its base again when it moved
        self.room_epoch = 0
        #: is any budget or rate limit defined (else calls skip the check)?
        self.active = False
        #: shared budgets replaced or deleted: (name, window start) -> their
        #: spend and holds, and grant (see L{load})
        self._dropped: dict[tuple[str, float], tuple[int, int]] = {}

    def load_limits(
        self, limits: Sequence[RateLimit], used: Mapping[str, int] | None = None
    ) -> None:
        """Replace the rate limits; one that counts the same keeps its minute,
        a new one starts from what the store recorded in it (C{used[name]});
        shared, from nothing: it uses only what it is granted
        (L{set_rate_grants}), and the store's count is in the grants."""
        now = self.now()
        old = {a.rule.name: a for a in self._rates}
        rates = []
        for rule in limits:
            prev = old.pop(rule.name, None)
            if prev is not None and prev.rule.counts_same(rule):
                prev.rule = rule
                prev.roll(now)
                prev.recap()
                rates.append(prev)
                continue
            if prev is not None:
                prev.live = False
            start = rule.window_start(now)
            if self.shared:  # this process's own use; the rest is in the grants
                rates.append(_RateAccount(rule, start, start + 60.0, granted=0))
            else:
                rates.append(
                    _RateAccount(rule, start, start + 60.0, (used or {}).get(rule.name, 0))
                )
        for gone in old.values():
            gone.live = False
        self._rates = rates
        self._loaded()

    def load(self, budgets: Sequence[Budget], spends: Mapping[str, float]) -> None:
        """Replace the definitions. A budget that counts the same calls over
        the same window as before keeps its live spend and reservations; a
        new one starts from the store's spend C{spends[name]}.

        Shared, a budget of a name this process held a grant of in the
        same window (redefined, or deleted and set again) starts from what
        its account had spent and held, and from its grant: the store's
        grant row of this process is the same, and the calls held on the
        account it replaces may all be spent (a fresh account was granted
        the whole grant again: $2.00 recorded on $1.00)."""
        self.return_allotments()  # before a kept budget rolls to a new window
        now = self.now()
        old = {a.budget.name: a for a in self._accounts}
        accounts = []
        for budget in budgets:
            prev = old.pop(budget.name, None)
            if prev is not None and prev.budget.counts_same(budget):
                prev.budget = budget
                prev.set_limit(budget.limit_usd)
                prev.roll(now)
                accounts.append(prev)
                continue
            if prev is not None:
                self._drop(prev)
            shared = self.shared and budget.action == "block"
            start = budget.window_start(now)
            # shared: this process's own spend, the rest is in the grants
            spent, granted = (0, 0) if shared else (_nano(spends.get(budget.name, 0.0)), None)
            earlier = self._dropped.pop((budget.name, start), None) if shared else None
            if earlier is not None:
                spent, granted = earlier
            accounts.append(
                _Account(budget, start, budget.window_end(now), spent=spent, granted=granted)
            )
        for gone in old.values():
            self._drop(gone)
        self._accounts = accounts
        self._loaded()

    def _drop(self, account: _Account) -> None:
        """An account replaced or deleted; a shared one's spend and holds
        (all counted as spent) and grant are kept for its window."""
        account.live = False
        if account.granted is not None:
            if len(self._dropped) >= 1024:  # names come and go: stay bounded
                self._dropped.clear()
            window = (account.budget.name, account.window_start)
            self._dropped[window] = (account.cap - account.free, account.granted)

    def _loaded(self) -> None:
        self._retire_plans()
        self.active = bool(self._accounts or self._rates)

    @property
    def outage(self) -> bool:
        """The collector cannot be reached: budgets with fail=open let calls
        through (flagged), so every call is held budget by budget."""
        return self._outage

    @outage.setter
    def outage(self, value: bool) -> None:
        if value:
            self.return_allotments()
        self._outage = value

    def return_allotments(self) -> None:
        """Give every allotment back to its accounts: their C{spent}, C{free} and
        C{reserved} are then the calls' own (a hold on an allotment given back
        settles account by account)."""
        for taken in self._allotments:
            taken.give_back()
        self._allotments = set()
        self._set_aside = 0

    def accounts(self) -> list[_Account]:
        """Every budget's account, its figures the calls' own (the allotments
        given back first)."""
        self.return_allotments()
        return self._accounts

    def _allot(self, plan: _ScopePlan, amount: int) -> _Allotment | None:
        """Room for a few calls of C{amount} from every account of C{plan},
        or None when too little is left for one (or enough allotments are out)."""
        if len(self._allotments) >= _MAX_ALLOTMENTS:
            return None
        accounts = plan.accounts
        room = min(a.free for a in accounts)
        aside = self._set_aside
        size = min(
            _ALLOT_CALLS * amount,
            room // _ALLOT_PART,
            (room + aside) // _ALLOT_ALL_PART - aside,
        )
        if size < amount or size <= 0:
            return None
        self._set_aside = aside + size
        for account in accounts:
            account.free -= size
        self.room_epoch += 1
        taken = _Allotment(plan, size)
        plan.allotment = taken
        self._allotments.add(taken)
        return taken

    def _retire_plans(self) -> None:
        """Forget every plan: an account rolled, or the definitions changed.
        The holds taken on them settle account by account, by window."""
        self.return_allotments()
        for plan in self._plans.values():
            plan.current = False
        self._plans = {}

    def _roll(self, scope: ScopeKey, now: float) -> _ScopePlan:
        """An account of C{scope}'s plan reached the end of its window: roll
        every account whose window ended by C{now}, and plan afresh. The
        allotments go back first: their room and spend are the old window's."""
        self.return_allotments()
        for account in self._accounts:
            if now >= account.window_end:
                account.roll(now)
        self._retire_plans()
        return self._plan(scope)

    def _plan(self, scope: ScopeKey) -> _ScopePlan:
        """The accounts and rate limits of a scope not seen since the last load."""
        plan = _ScopePlan(
            tuple(a for a in self._accounts if scope_matches(a.budget, *scope)),
            tuple(r for r in self._rates if scope_matches(r.rule, *scope)),
            self,
        )
        if len(self._plans) >= 4096:  # labels come from clients: stay bounded
            self._retire_plans()
        self._plans[scope] = plan
        return plan

    def reserve(
        self,
        scope: ScopeKey,
        worst: float | None,
        tokens: int | None = None,
        now: float | None = None,
    ) -> BudgetHold | BudgetRefusal | RateRefusal:
        """Check the call against every budget and rate limit of its scope,
        and reserve its worst case (C{None}: unknown; C{tokens}: its most
        input + output tokens) on each if none refuses it.

        @param scope: a L{CallScope}, or a plain tuple of its six fields.
        @param now: the time of the check, when the caller has it (else read).
        """
        plan = self._plans.get(scope)
        if plan is None:
            plan = self._plan(scope)
        if now is None:
            now = self.now()
        if now >= plan.next_end:
            plan = self._roll(scope, now)
        # The common case: a priced call held on its scope's allotment, one
        # figure for all of its budgets (the allotment already taken from
        # them; none is out in an outage)
        taken = plan.allotment
        if taken is not None and worst is not None:
            amount = ceil(worst * 1e9 - 1e-6)  # nano_up, inline (1e9: _NANO, a float)
            avail = taken.avail - amount
            if avail >= 0 and taken.epoch == self.room_epoch:
                # (L{_hold}, inline: this is every call of the common case)
                taken.avail = avail
                left = taken.base + avail  # the least room left once held
                if self.shared and left < 4 * max(amount, 1) and self.on_low:
                    self.on_low()  # fewer than four more calls like this one fit: ask now
                if 0 <= left < _TABLES_BELOW:  # _usd_header, inline: a call less
                    micro = left // 1000
                    header = (
                        _DOLLARS[micro // 1_000_000]
                        + _THREE_DIGITS[micro // 1000 % 1000]
                        + _THREE_DIGITS[micro % 1000]
                    )
                else:
                    header = _usd_header(left)
                return BudgetHold(plan, amount, left, (), header, taken)
        return self._reserve_other(plan, now, worst, tokens)

    def _hold(
        self,
        plan: _ScopePlan,
        amount: int,
        left: int | None,
        flags: tuple[str, ...] = (),
        taken: _Allotment | None = None,
    ) -> BudgetHold:
        """The hold of a call of C{amount} on C{plan} (on C{taken}, when an
        allotment), C{left} the least room its budgets have once it is held;
        shared budgets ask the store for more when fewer than four more
        calls like it fit."""
        if self.shared and left is not None and left < 4 * max(amount, 1) and self.on_low:
            self.on_low()
        return BudgetHold.of(plan, amount, left, flags, taken)

    def _give_back(self, taken: _Allotment) -> None:
        """Give one allotment back (its scope needs a new one)."""
        taken.give_back()
        self._allotments.discard(taken)
        self._set_aside -= taken.size

    def _reserve_other(
        self, plan: _ScopePlan, now: float, worst: float | None, tokens: int | None
    ) -> BudgetHold | BudgetRefusal | RateRefusal:
        """L{reserve} when its common case does not apply: a new allotment,
        its base read again, or a call held budget by budget."""
        if not plan.plain or worst is None or self.outage:
            if plan.rates:
                return self._reserve_with_rates(plan, now, worst, tokens)
            if not plan.accounts:
                return BudgetHold.of(_NO_BUDGETS, 0, None)
            return self._reserve_each(plan, worst)
        amount = nano_up(worst)
        taken = plan.allotment
        if taken is None or taken.avail < amount:
            if taken is not None:
                self._give_back(taken)
            taken = self._allot(plan, amount)
        if taken is not None:
            if taken.epoch != self.room_epoch:
                # room was taken outside this allotment since its base was read
                # (another allotment, a call held budget by budget): read it
                # again, so that X-LLMObserve-Budget-Remaining never says
                # more is left than is (room given back only makes it say less)
                taken.base = min(a.free for a in plan.accounts)
                taken.epoch = self.room_epoch
            taken.avail -= amount
            return self._hold(plan, amount, taken.base + taken.avail, (), taken)
        # Too little room for an allotment: a priced call that fits every budget
        # of its scope, in one pass (anything else takes _reserve_each)
        accounts = plan.accounts
        left = accounts[0].free - amount  # the least room left, once held
        for account in accounts:
            free = account.free - amount
            if free < 0:  # a warn flag or a refusal: undo, the careful way
                for held in accounts:
                    if held is account:
                        break
                    held.free += amount
                return self._reserve_each(plan, worst)
            account.free = free
            if free < left:
                left = free
        self.room_epoch += 1  # the allotments' bases may be more than is left
        return self._hold(plan, amount, left)

    def _reserve_with_rates(
        self, plan: _ScopePlan, now: float, worst: float | None, tokens: int | None
    ) -> BudgetHold | BudgetRefusal | RateRefusal:
        """L{reserve} for a scope with rate limits: those first, then the budgets."""
        rates = self._check_rates(plan.rates, now, tokens)
        if isinstance(rates, RateRefusal):
            return rates
        if plan.accounts:
            hold = self._reserve_each(plan, worst)
        else:
            hold = BudgetHold.of(_NO_BUDGETS, 0, None)
        if isinstance(hold, BudgetRefusal):
            for rate, _, want in rates:
                rate.reserved -= want
            return hold
        hold._rates = rates
        if tokens is None and any(r.rule.unit == "tokens" for r, _, _ in rates):
            hold.flags += ("rate_unbounded",)
        if self.outage and any(
            r.granted is not None and r.used + r.reserved > r.cap for r, _, _ in rates
        ):
            hold.flags += ("rate_fail_open",)
        return hold

    def _check_rates(
        self, matched: tuple[_RateAccount, ...], now: float, tokens: int | None
    ) -> list[tuple[_RateAccount, float, int]] | RateRefusal:
        wants = []
        for rate in matched:
            if now >= rate.window_end:
                rate.roll(now)
            want = 1 if rate.rule.unit == "calls" else tokens
            busy = rate.used + rate.reserved
            cap = rate.cap
            if (want is None and busy >= cap) or (want is not None and busy + want > cap):
                if rate.granted is None:
                    wait = max(1, math.ceil(rate.window_end - now))
                    return RateRefusal(rate.rule, rate.used, rate.reserved, want, wait)
                if not (self.outage and rate.rule.fail == "open"):
                    return self._rate_share_refused(rate, now, want)
            wants.append(want or 0)
        held = []
        for rate, want in zip(matched, wants, strict=True):
            rate.reserved += want
            held.append((rate, rate.window_start, want))
            if (
                rate.granted is not None
                and rate.cap - rate.used - rate.reserved < 4 * max(want, 1)
                and self.on_low
            ):
                self.on_low()  # fewer than four more calls like this one fit: ask now
        return held

    def _rate_share_refused(self, rate: _RateAccount, now: float, want: int | None) -> RateRefusal:
        """A shared limit past this process's grant: the rest of the minute
        may be granted to it soon (asked for now) unless the limit itself is
        spent, so the client is told to retry in a second while the grant is
        below the limit."""
        if want is not None and want > rate.wanted:
            rate.wanted = want
        if self.on_low is not None:
            self.on_low()
        wait = max(1, math.ceil(rate.window_end - now))
        if rate.cap < rate.rule.per_minute:
            wait = 1
        return RateRefusal(rate.rule, rate.used, rate.reserved, want, wait, shared=True)

    def _reserve_each(self, plan: _ScopePlan, worst: float | None) -> BudgetHold | BudgetRefusal:
        """Budget by budget: warn flags, unknown prices, fail-open in an
        outage, refusals, and every call of a scope with rate limits (the
        accounts' windows are current).

        With allotments out, an account's room leaves theirs out: a call that
        fits is held in what is left; one that a budget would refuse or
        flag is checked again once they are given back, by the calls' own
        figures."""
        amount = 0 if worst is None else nano_up(worst)
        flags: tuple[str, ...] = ()
        for account in plan.accounts:
            b = account.budget
            cap = account.cap
            used = cap - account.free
            if self.outage and b.fail == "open" and account.granted is not None:
                flags += ("budget_fail_open",)
                continue
            if worst is None:
                if b.action == "block" and (b.unpriced == "block" or used >= cap):
                    if self._allotments:
                        self.return_allotments()
                        return self._reserve_each(plan, worst)
                    return self._refused(account, None, "no price is known for this call")
            elif used + amount > cap:
                if self._allotments:
                    self.return_allotments()
                    return self._reserve_each(plan, worst)
                if b.action == "block":
                    return self._refused(account, worst, "this call could cost up to")
                flags += (f"budget_warn:{b.name}",)
        if worst is None:
            flags += ("budget_unpriced",)
        left = None
        for account in plan.accounts:
            account.free -= amount
            rest = account.free
            if left is None or rest < left:
                left = rest
        self.room_epoch += 1  # the allotments' bases may be more than is left
        return self._hold(plan, amount, left, flags)

    def _refused(self, account: _Account, worst: float | None, reason: str) -> BudgetRefusal:
        if account.granted is not None:
            if worst is not None:
                want = nano_up(worst)
                if want > account.wanted:
                    account.wanted = want
            self.asks += 1  # before on_low: the exchange it starts carries this want
            if self.on_low is not None:
                self.on_low()  # the store may grant more for the next call
        return account.refusal(worst, reason)

    def grant_snapshot(self) -> dict[str, tuple[float, int, int]]:
        """Shared budgets: name -> (window start, spent, spent + in flight)."""
        self.return_allotments()
        return {
            a.budget.name: (a.window_start, a.spent, a.spent + a.reserved)
            for a in self._accounts
            if a.granted is not None
        }

    def grant_caps(self) -> dict[str, int]:
        """Shared budgets: name -> what this process may spend in the window
        now (nano-USD, its grant within the limit). Reported with each
        exchange: until the answer is applied, calls are admitted up to
        it, so the store counts at least that much as this process's."""
        return {a.budget.name: a.cap for a in self._accounts if a.granted is not None}

    def grant_wants(self) -> dict[str, int]:
        """Shared budgets: name -> the most a call refused for want of grant
        could cost (nano-USD), for those that refused one since the last grant."""
        return {
            a.budget.name: a.wanted for a in self._accounts if a.granted is not None and a.wanted
        }

    def rate_grant_snapshot(self, now: float) -> list[tuple[str, float, int, int, int]]:
        """Shared rate limits: (name, minute, used, used + in flight, the
        most a refused call wanted) for this minute, and for the next one
        (nothing used yet) once this one has less than C{RATE_AHEAD} seconds
        to run, so that a grant of it is here when it begins."""
        out = []
        for rate in self._rates:
            if rate.granted is None:
                continue
            if now >= rate.window_end:
                rate.roll(now)
            busy = rate.used + rate.reserved
            out.append((rate.rule.name, rate.window_start, rate.used, busy, rate.wanted))
            if rate.window_end - now < RATE_AHEAD:
                out.append((rate.rule.name, rate.window_end, 0, 0, 0))
        return out

    def set_rate_grants(self, grants: Mapping[str, Sequence[tuple[float, int]]]) -> None:
        """Shared rate limits: what was granted, by name (minute start, amount)."""
        for rate in self._rates:
            got = grants.get(rate.rule.name)
            if got is None or rate.granted is None:
                continue
            for minute, amount in got:
                if minute == rate.window_start:
                    rate.granted = amount
                    rate.wanted = 0
                    rate.recap()
                elif minute == rate.window_end:
                    rate.ahead = (minute, amount)

    def set_recorded(self, spends: Mapping[str, tuple[float | None, float]]) -> None:
        """Shared budgets: each budget's spend as the store reports it, by
        name (its window's start, None for C{total}; USD), every process's."""
        for account in self._accounts:
            got = spends.get(account.budget.name)
            if got is None or account.granted is None:
                continue
            start = -math.inf if got[0] is None else got[0]
            if start == account.window_start:
                account.recorded = _nano(got[1])

    def set_grants(self, grants: Mapping[str, tuple[float, int]]) -> None:
        """Shared budgets: what the store granted, by name (window start, nano-USD)."""
        self.return_allotments()  # a cap may go down: no allotment keeps room past it
        for account in self._accounts:
            got = grants.get(account.budget.name)
            if got is not None and account.granted is not None:
                if got[0] == account.window_start:
                    account.granted = got[1]
                    account.wanted = 0
