"""Allotments: a scope's calls are held on room taken at once from all of
its budgets. They change what a call costs, never what it is told: any run
of calls from several scopes is admitted, flagged and refused exactly as
by budgets written call by call, ends with the same spend, and no call is
told more is left than is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.budgets import store_with
from twisted.internet.task import Clock

from llmobserve.collector import Budget
from llmobserve.proxy import _budgets
from llmobserve.proxy._budgetpoll import BudgetPoller
from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, BudgetRefusal, CallScope

T0 = 1_750_000_000.0
SCOPES = [
    CallScope("openai", "gpt-4o-mini", customer="acme"),
    CallScope("openai", "gpt-4o-mini", customer="globex"),
    CallScope("anthropic", "claude-haiku-4", customer="acme"),
]
BUDGETS = [
    Budget("everything", 1.0),
    Budget("hourly", 0.3, "hour"),
    Budget("acme", 0.4, customer="acme"),
    Budget("openai", 0.7, provider="openai"),
    Budget("warn", 0.5, action="warn"),
]


def book(
    allot: bool, monkeypatch: pytest.MonkeyPatch, clock: Clock, shared: bool = False
) -> BudgetLedger:
    ledger = BudgetLedger(clock.seconds, shared=shared)
    ledger.load(BUDGETS, {})
    if not allot:
        monkeypatch.setattr(ledger, "_allot", lambda plan, amount: None)
    return ledger


#: a call from scope S worth up to W USD, the settling of the Nth hold
#: still open at cost C (None: no price) and outcome O, the clock moving
#: on (past an hour's end, at times), the budgets loaded again, and, when
#: shared, a grant of G nano-USD on budget B, an outage, a grant exchange
_STEP = st.one_of(
    st.tuples(st.just("tick"), st.integers(1, 1800), st.none()),
    st.tuples(st.just("load"), st.just(0), st.none()),
    st.tuples(st.just("grant"), st.integers(0, len(BUDGETS) - 1), st.integers(0, 10**9)),
    st.tuples(st.just("outage"), st.integers(0, 1), st.none()),
    st.tuples(st.just("snapshot"), st.just(0), st.none()),
    st.tuples(
        st.just("call"),
        st.integers(0, len(SCOPES) - 1),
        st.one_of(st.none(), st.integers(1, 60_000).map(lambda n: n / 1e6)),
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 1000),
        st.tuples(
            st.one_of(st.none(), st.floats(0.0, 1.0), st.floats(1.0, 1.5)),
            st.sampled_from(["ok", "budget_refused", "client_aborted"]),
        ),
    ),
)


def _verdict(v: BudgetHold | Any) -> tuple[Any, ...]:
    if isinstance(v, BudgetHold):
        return ("held", v.flags)
    assert isinstance(v, BudgetRefusal)
    return ("refused", v.budget.name, v.spend_usd, v.reserved_usd, v.reason)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=400), st.booleans())
def test_any_run_of_calls_ends_as_without_allotments(steps: list[Any], shared: bool) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        clock = Clock()
        clock.advance(T0)
        fast = book(True, monkeypatch, clock, shared)
        exact = book(False, monkeypatch, clock, shared)
        open_holds: list[tuple[BudgetHold, BudgetHold, float | None]] = []
        for kind, index, arg in steps:
            if kind == "tick":
                clock.advance(index)
            elif kind == "load":
                fast.load(BUDGETS, {})
                exact.load(BUDGETS, {})
            elif kind == "grant":
                name = BUDGETS[index].name
                window = exact.grant_snapshot().get(name)
                if window is not None:  # a shared block budget
                    fast.set_grants({name: (window[0], arg)})
                    exact.set_grants({name: (window[0], arg)})
            elif kind == "outage":
                fast.outage = exact.outage = bool(index)
            elif kind == "snapshot":
                assert fast.grant_snapshot() == exact.grant_snapshot()
            elif kind == "call":
                scope, worst = SCOPES[index], arg
                a, b = fast.reserve(scope, worst), exact.reserve(scope, worst)
                assert _verdict(a) == _verdict(b)
                if isinstance(a, BudgetHold) and isinstance(b, BudgetHold):
                    if b.remaining is not None:
                        # the tightest budget's room: never more than is left
                        assert a.remaining is not None and a.remaining <= b.remaining
                    open_holds.append((a, b, worst))
            elif open_holds:
                a, b, worst = open_holds.pop(index % len(open_holds))
                fraction, outcome = arg
                # an unpriced call (held at $0) may be priced at its end
                cost = None if fraction is None else (worst or 0.05) * fraction
                a.settle(cost, outcome, 200)
                b.settle(cost, outcome, 200)
        for a, b, _ in open_holds:
            a.settle(None, "ok", 200)
            b.settle(None, "ok", 200)
        figures = [(x.budget.name, x.spent, x.reserved, x.free) for x in fast.accounts()]
        assert figures == [(x.budget.name, x.spent, x.reserved, x.free) for x in exact.accounts()]


def test_one_scope_is_told_exactly_what_is_left() -> None:
    """With one scope in flight the header is the room left, to the nano-dollar."""
    ledger = BudgetLedger(lambda: T0)
    ledger.load([Budget("cap", 1.0)], {})
    holds = [ledger.reserve(SCOPES[0], 0.01) for _ in range(40)]
    assert all(isinstance(h, BudgetHold) for h in holds)
    assert [h.remaining for h in holds if isinstance(h, BudgetHold)] == [
        pytest.approx(1.0 - 0.01 * (i + 1)) for i in range(40)
    ]
    assert ledger._allotments, "the calls were held on an allotment"


def test_a_refusal_gives_back_the_room_other_scopes_hold() -> None:
    """One scope's allotment never refuses another scope's call that the
    budget has room for: the room is given back, the call checked again."""
    ledger = BudgetLedger(lambda: T0)
    ledger.load([Budget("cap", 1.0)], {})
    first = ledger.reserve(SCOPES[0], 0.05)  # takes an allotment of $0.125
    assert isinstance(first, BudgetHold) and ledger._allotments
    big = ledger.reserve(SCOPES[1], 0.95)  # fits only with that room back
    assert isinstance(big, BudgetHold) and big.remaining == 0.0
    assert not ledger._allotments
    refused = ledger.reserve(SCOPES[0], 0.000001)
    assert isinstance(refused, BudgetRefusal) and refused.reason == "it is spent"


def test_many_scopes_take_at_most_so_many_allotments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap on allotments out, a scope's calls are held budget by budget."""
    monkeypatch.setattr(_budgets, "_MAX_ALLOTMENTS", 2)
    ledger = BudgetLedger(lambda: T0)
    ledger.load([Budget("cap", 100.0)], {})
    scopes = [CallScope("openai", "gpt-4o-mini", customer=f"c{i}") for i in range(4)]
    holds = [ledger.reserve(scope, 0.01) for scope in scopes]
    assert all(isinstance(h, BudgetHold) for h in holds)
    assert len(ledger._allotments) == 2
    [cap] = ledger.accounts()
    assert cap.reserved == 4 * 10_000_000


def test_a_call_that_cost_more_than_its_hold_is_seen_by_the_allotments() -> None:
    """A call held budget by budget that settles above its worst case takes
    room the allotments' bases did not see: the next call reads it again."""
    ledger = BudgetLedger(lambda: T0)
    ledger.load([Budget("cap", 1.0)], {})
    assert isinstance(ledger.reserve(SCOPES[0], 0.01), BudgetHold)  # allotment: $0.125
    big = ledger.reserve(SCOPES[1], 0.2)  # no allotment fits: held on the budget
    assert isinstance(big, BudgetHold) and big._allotment is None
    assert isinstance(ledger.reserve(SCOPES[0], 0.01), BudgetHold)  # its base read again
    big.settle(0.3, "ok", 200)  # $0.10 more than it held
    after = ledger.reserve(SCOPES[0], 0.01)
    assert isinstance(after, BudgetHold) and after.remaining is not None
    [cap] = ledger.accounts()
    assert after.remaining <= cap.free / 1e9


def test_the_once_a_second_read_of_the_budgets_gives_every_allotment_back(
    tmp_path: Path,
) -> None:
    """Room a scope set aside and no longer uses goes back to the budgets at
    the poller's next read, budgets changed or not."""
    path = store_with(tmp_path / "events.sqlite3", Budget("cap", 1.0, "day"))
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds)
    poller = BudgetPoller(clock, ledger, str(path))
    poller.load_now()
    hold = ledger.reserve(SCOPES[0], 0.01)
    assert isinstance(hold, BudgetHold) and ledger._allotments
    hold.settle(0.01, "ok", 200)
    poller._apply(poller._read(*poller._snapshots()))  # nothing changed
    assert not ledger._allotments
    [cap] = ledger._accounts  # the figures as they are, not given back by accounts()
    assert (cap.spent, cap.reserved, cap.free) == (10_000_000, 0, 990_000_000)
