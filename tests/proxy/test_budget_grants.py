"""Budgets shared by several processes: each spends only the slices the
store grants it (budget_grants), so together they never pass the limit.

The C{grants} fixture is a SQLite file's and a PostgreSQL database's (a
real server, tests/support/postgres.py): both keep the grants' contract."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.budgets import store_with
from twisted.internet.task import Clock

from llmobserve.collector import Budget, GrantBook
from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, BudgetRefusal, CallScope

T0 = 1_750_000_000.0
NANO = 1_000_000_000
GPT = CallScope("openai", "gpt-4o-mini")
CAP = Budget("cap", 1.0, "day")


@pytest.fixture(params=["sqlite", "postgres"])
def grants(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GrantBook]:
    if request.param == "sqlite":
        db = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
        yield GrantBook(db, dead_after=30)
        db.close()
    else:
        from llmobserve.collector._pgstore import PgEventStore

        store = PgEventStore(request.getfixturevalue("pg_url"))
        yield GrantBook(store.sql(), dead_after=30)
        store.close()


def test_grants_never_sum_past_the_limit_and_count_what_was_recorded(grants: GrantBook) -> None:
    """The window's first grant records the store's spend so far; holders get
    slices of what is left; all grants together stay within the limit."""
    start = CAP.window_start(T0)
    a = grants.exchange(CAP, start, "a", spent=0, busy=0, now=T0, recorded=lambda: 0.2)
    b = grants.exchange(CAP, start, "b", spent=0, busy=0, now=T0, recorded=lambda: 0.2)
    assert a == NANO // 4 and b == NANO // 8  # a quarter of the limit per live holder
    total = 0.2 * NANO + a + b
    for i in range(50):  # both spend all they get, then ask again (no event stored yet)
        a = grants.exchange(CAP, start, "a", spent=a, busy=a, now=T0 + i, recorded=lambda: 0.2)
        b = grants.exchange(CAP, start, "b", spent=b, busy=b, now=T0 + i, recorded=lambda: 0.2)
        total = 0.2 * NANO + a + b
        assert total <= NANO
    assert total == NANO


def test_a_silent_holder_keeps_its_whole_grant_counted(grants: GrantBook) -> None:
    """A holder that stops reporting may have spent all of its grant since
    its last report (its events still in its spool): its grant stays
    counted, not only what it reported spent (until this version the rest
    went back to the others, and the budget could be passed by it)."""
    start = CAP.window_start(T0)
    grants.exchange(CAP, start, "gone", spent=0, busy=0, now=T0, recorded=lambda: 0.0)
    gone = grants.exchange(
        CAP, start, "gone", spent=NANO // 10, busy=NANO // 10, now=T0 + 1, recorded=lambda: 0.0
    )
    assert gone > NANO // 10
    got = 0
    for i in range(40):
        got = grants.exchange(
            CAP, start, "me", spent=got, busy=got, now=T0 + 40 + i, recorded=lambda: 0.0
        )
    assert got == NANO - gone


def test_a_shared_ledger_spends_only_its_grant_and_asks_when_low() -> None:
    """Nothing is admitted before a grant; a call that would pass the grant is
    refused (this process's share); running low asks the store at once."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    asked: list[int] = []
    ledger.on_low = lambda: asked.append(1)
    ledger.load([CAP], {"cap": 0.5})  # shared: the store's spend is in the grants
    refusal = ledger.reserve(GPT, 0.01)
    assert isinstance(refusal, BudgetRefusal) and "share" in refusal.message()
    assert asked
    [(name, (window, spent, busy))] = ledger.grant_snapshot().items()
    assert (name, spent, busy) == ("cap", 0, 0)
    ledger.set_grants({"cap": (window, NANO // 10)})  # $0.10
    holds = [ledger.reserve(GPT, 0.01) for _ in range(12)]
    assert sum(isinstance(h, BudgetHold) for h in holds) == 10


def test_a_refusal_by_the_share_names_the_share_not_only_the_limit() -> None:
    """A proxy on a collector refused a call at 15 % of its budget with "spend
    $0 + in flight $0.0004626 of limit $0.003; this call could cost up to
    $0.0004626": figures that fit the limit. It names the share that refused it."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    ledger.load([Budget("cap", 0.003, "day")], {})
    [(_, (window, _, _))] = ledger.grant_snapshot().items()
    ledger.set_grants({"cap": (window, 750_000)})  # a quarter of $0.003
    assert isinstance(ledger.reserve(GPT, 0.0004626), BudgetHold)
    refusal = ledger.reserve(GPT, 0.0004626)
    assert isinstance(refusal, BudgetRefusal)
    assert refusal.message() == (
        "budget 'cap' (day) would be exceeded: this process's spend $0 + in flight"
        " $0.0004626 of its share $0.00075 (limit $0.003, shared with other processes:"
        " what they hold and do not spend is granted again);"
        " this call could cost up to $0.0004626"
    )
    assert refusal.detail()["share_usd"] == 0.00075
    alone = BudgetLedger(clock.seconds)  # one process: no share in the message
    alone.load([Budget("cap", 0.0005, "day")], {})
    assert isinstance(alone.reserve(GPT, 0.0004626), BudgetHold)
    refusal = alone.reserve(GPT, 0.0004626)
    assert isinstance(refusal, BudgetRefusal) and "share" not in refusal.message()
    assert not refusal.may_grant  # the limit itself: no exchange can change it
    assert "share_usd" not in refusal.detail()


def test_a_refusal_by_a_budget_the_store_says_is_spent_names_the_budget_s_spend() -> None:
    """A budget over its limit ($0.018 recorded on $0.003) refused a proxy's
    call with "this process's spend $0 + in flight $0 of its share $0 ...;
    this process's share is spent" and spend_usd 0 (a new user's finding):
    with the store's spend reported (a collector's /api/budgets), the
    refusal says the budget is spent, with that spend and no share. A
    share refusal of a budget with room left still names the share."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    cap = Budget("cap", 0.003, "day")
    ledger.load([cap], {})
    [(_, (window, _, _))] = ledger.grant_snapshot().items()
    ledger.set_grants({"cap": (window, 0)})
    ledger.set_recorded({"cap": (window, 0.0015)})  # half spent: others hold the rest
    refusal = ledger.reserve(GPT, 0.0004626)
    assert isinstance(refusal, BudgetRefusal) and refusal.share_usd is not None
    assert refusal.may_grant
    ledger.set_recorded({"cap": (window - 86400, 0.018)})  # yesterday's: not this window's
    refusal = ledger.reserve(GPT, 0.0004626)
    assert isinstance(refusal, BudgetRefusal) and refusal.share_usd is not None
    ledger.set_recorded({"cap": (window, 0.018)})
    refusal = ledger.reserve(GPT, 0.0004626)
    assert isinstance(refusal, BudgetRefusal)
    assert refusal.message() == (
        "budget 'cap' (day) would be exceeded: spend $0.018 + in flight $0 of limit $0.003;"
        " it is spent"
    )
    assert refusal.share_usd is None and refusal.detail()["spend_usd"] == 0.018
    # the next exchange may bring a raised limit: the relay waits for it first
    assert refusal.may_grant
    total = BudgetLedger(clock.seconds, shared=True)  # a total budget: no window start
    total.load([Budget("all", 0.003, "total")], {})
    [(_, (start, _, _))] = total.grant_snapshot().items()
    total.set_grants({"all": (start, 0)})
    total.set_recorded({"all": (None, 0.003)})
    refusal = total.reserve(GPT, 0.0001)
    assert isinstance(refusal, BudgetRefusal) and refusal.reason == "it is spent"


def test_two_shared_ledgers_on_one_store_never_overshoot(grants: GrantBook) -> None:
    """Two processes' ledgers, exchanging with one grant table as their
    pollers do, admit calls worth $0.01 each against $1.00: spend never past
    $1.00 (overshoot $0); near the limit the room left can be split between
    the two grants, so one call may be refused that one process would have
    admitted."""
    clock = Clock()
    clock.advance(T0)
    ledgers = [BudgetLedger(clock.seconds, shared=True) for _ in range(2)]
    for ledger in ledgers:
        ledger.load([CAP], {})
    admitted = 0
    for step in range(400):
        for n, ledger in enumerate(ledgers):
            if step % 7 == n:  # the poller's exchange
                [(name, (window, spent, busy))] = ledger.grant_snapshot().items()
                got = grants.exchange(
                    CAP,
                    window,
                    f"p{n}",
                    spent=spent,
                    busy=busy,
                    now=clock.seconds(),
                    recorded=lambda: 0.0,
                )
                ledger.set_grants({name: (window, got)})
            hold = ledger.reserve(GPT, 0.01)
            if isinstance(hold, BudgetHold):
                admitted += 1
                hold.settle(0.01, "ok", 200)
        clock.advance(0.01)
    assert admitted in (99, 100)
    spent = sum(a.spent for ledger in ledgers for a in ledger.accounts())
    assert spent == admitted * NANO // 100 <= NANO


def test_a_lowered_limit_shrinks_the_grants(grants: GrantBook) -> None:
    """A budget lowered from $5 to $0.05 while a proxy on a collector held a
    $1.25 slice of it: the proxy kept the slice, its cap became the whole new
    limit, and it spent $0.0495 of its own on top of the $0.00315 recorded
    before ($0.0531 of $0.05). Each holder's next exchange shrinks its grant
    to what it spent and holds plus a slice of the room left: the new limit
    holds, and the room is still granted."""
    clock = Clock()
    clock.advance(T0)
    big, small = Budget("cap", 5.0, "day"), Budget("cap", 0.05, "day")
    ledger = BudgetLedger(clock.seconds, shared=True)
    ledger.load([big], {})

    def poll(budget: Budget, recorded: float = 0.0) -> int:
        """What the poller does each second: the definitions, then an exchange."""
        [(window, spent, busy)] = ledger.grant_snapshot().values()
        ledger.load([budget], {})
        got = grants.exchange(
            budget,
            window,
            "me",
            spent=spent,
            busy=busy,
            now=clock.seconds(),
            recorded=lambda: recorded,
        )
        ledger.set_grants({"cap": (window, got)})
        return got

    def other(budget: Budget) -> int:
        """A second live holder that spends nothing."""
        window = budget.window_start(T0)
        now = clock.seconds()
        return grants.exchange(
            budget, window, "other", spent=0, busy=0, now=now, recorded=lambda: 0.0
        )

    assert poll(big, recorded=0.00315) == 5 * NANO // 4
    assert other(big) > 0
    spent = 0
    for _ in range(200):
        poll(small)
        other(small)
        hold = ledger.reserve(GPT, 0.00045)
        if isinstance(hold, BudgetHold):
            hold.settle(0.00045, "ok", 200)
            spent += 450_000
        clock.advance(0.1)
    assert 3_150_000 + spent + other(small) <= NANO // 20
    assert spent >= 40 * 450_000  # the room left was granted, not only refused


def test_during_an_outage_fail_open_budgets_let_calls_through_flagged() -> None:
    """With the collector unreachable, a fail-closed budget admits only what
    its grant holds; a fail-open one lets calls through, flagged."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    ledger.load([CAP, Budget("open", 1.0, "day", fail="open", model="gpt-4o-mini")], {})
    ledger.outage = True
    refused = ledger.reserve(GPT, 0.01)
    assert isinstance(refused, BudgetRefusal) and refused.budget.name == "cap"
    ledger.load([Budget("open", 1.0, "day", fail="open")], {})
    hold = ledger.reserve(GPT, 0.01)
    assert isinstance(hold, BudgetHold) and hold.flags == ("budget_fail_open",)
    ledger.outage = False
    assert isinstance(ledger.reserve(GPT, 0.01), BudgetRefusal)  # back to its grant (none)


def test_spend_past_a_grant_is_counted_in_the_grants(grants: GrantBook) -> None:
    """A holder that spent past its grant (fail open during an outage) has its
    grant grown to its spend, so the others' room shrinks by that much."""
    start = CAP.window_start(T0)
    grants.exchange(CAP, start, "a", spent=0, busy=0, now=T0, recorded=lambda: 0.0)
    a = grants.exchange(
        CAP, start, "a", spent=NANO // 2, busy=NANO // 2, now=T0 + 1, recorded=lambda: 0.0
    )
    assert a >= NANO // 2
    got = 0
    for i in range(20):
        got = grants.exchange(
            CAP, start, "b", spent=got, busy=got, now=T0 + 2 + i, recorded=lambda: 0.0
        )
    assert a + got <= NANO


def test_release_gives_back_what_is_not_busy(grants: GrantBook) -> None:
    """A stopping holder keeps only what it has spent or in flight."""
    start = CAP.window_start(T0)
    got = grants.exchange(CAP, start, "a", spent=0, busy=0, now=T0, recorded=lambda: 0.0)
    assert got == NANO // 4
    grants.release(CAP, start, "a", NANO // 100)
    other = grants.exchange(CAP, start, "b", spent=0, busy=0, now=T0, recorded=lambda: 0.0)
    assert other == NANO // 8  # a slice: a quarter of the limit split between two live holders
    for i in range(40):
        other = grants.exchange(
            CAP, start, "b", spent=other, busy=other, now=T0 + i, recorded=lambda: 0.0
        )
    assert other == NANO - NANO // 100


def test_collectors_on_one_postgres_database_never_grant_past_the_limit(pg_url: str) -> None:
    """Four connections to one database (four collectors' reader threads)
    exchange grants for one budget at once, each holder spending all it
    gets and asking again: the budget's advisory lock makes the exchanges
    take turns, so the grants of the window never sum past the limit."""
    import psycopg

    from llmobserve.collector._pgstore import PgEventStore

    start = CAP.window_start(T0)
    errors: list[BaseException] = []

    def holder(n: int) -> None:
        store = PgEventStore(pg_url)
        try:
            book = GrantBook(store.sql(), dead_after=30)
            got = 0
            for i in range(100):
                got = book.exchange(
                    CAP, start, f"h{n}", spent=got, busy=got, now=T0 + i, recorded=lambda: 0.25
                )
        except BaseException as e:
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=holder, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with psycopg.connect(pg_url) as conn:
        rows: list[tuple[str, int]] = conn.execute(
            "SELECT holder, granted FROM budget_grants"
        ).fetchall()
    assert sorted(h for h, _ in rows) == ["_recorded", "h0", "h1", "h2", "h3"]
    assert dict(rows)["_recorded"] == NANO // 4  # read once, by the window's first grant
    assert sum(g for _, g in rows) == NANO  # all of it handed out, never more


class _Holder:
    """One process's ledger and what its poller does: report, take a grant."""

    def __init__(self, name: str, budget: Budget, clock: Clock) -> None:
        self.name = name
        self.budget = budget
        self.clock = clock
        self.ledger = BudgetLedger(clock.seconds, shared=True)
        self.ledger.load([budget], {})
        self.spent = 0  # nano-USD this process spent (settled)

    def exchange(self, grants: GrantBook, stored: list[int]) -> int:
        """The poller's exchange; C{stored}: the store's spend from its events."""
        got = self.send(grants, stored)
        self.apply(got)
        return got[2]

    def send(self, grants: GrantBook, stored: list[int]) -> tuple[str, float, int]:
        """The exchange's report and the store's answer, not yet applied
        (name, window, grant): calls admitted meanwhile are on their way."""
        [(name, (window, spent, busy))] = self.ledger.grant_snapshot().items()
        got = grants.exchange(
            self.budget,
            window,
            self.name,
            spent=spent,
            busy=busy,
            now=self.clock.seconds(),
            recorded=lambda: stored[0] / NANO,
            want=self.ledger.grant_wants().get(name, 0),
            cap=self.ledger.grant_caps()[name],
        )
        return name, window, got

    def apply(self, got: tuple[str, float, int]) -> None:
        """What the poller does with the answer: the definition, then the grant."""
        name, window, granted = got
        self.ledger.load([self.budget], {})
        self.ledger.set_grants({name: (window, granted)})

    def spend(self, cost: float, most: int = 200) -> int:
        """Calls of C{cost} until one is refused; what they spent (nano-USD)."""
        before = self.spent
        for _ in range(most):
            hold = self.ledger.reserve(GPT, cost)
            if not isinstance(hold, BudgetHold):
                break
            hold.settle(cost, "ok", 200)
            self.spent += round(cost * NANO)
        return self.spent - before


def test_a_proxy_that_dies_in_an_outage_never_lets_the_budget_pass(grants: GrantBook) -> None:
    """Proxy A takes its slice, loses the collector, spends all of it
    (fail closed) and is killed before the collector is back: it never
    reports that spend; its events reach the store a minute later (its
    spool, delivered by a restarted A). Proxy B keeps asking every second
    and spends all it gets, its events stored at once. Until this version
    A's grant went back to B once A was silent for 30 s: B's spend and A's
    ran to $1.25 of $1.00. A's grant stays counted: B's spend plus A's real
    spend never pass the limit, and B still gets all the rest."""
    clock = Clock()
    clock.advance(T0)
    a, b = _Holder("a", CAP, clock), _Holder("b", CAP, clock)
    stored = [0]  # the store's spend in the window, from its events (nano-USD)
    granted_a = a.exchange(grants, stored)
    b.exchange(grants, stored)
    assert granted_a == NANO // 4
    a.ledger.outage = True  # the collector is gone: A spends what it holds
    a_real = a.spend(0.01)
    assert a_real == granted_a  # all of it, reported to nobody
    for second in range(120):
        clock.advance(1)
        if second == 60:
            stored[0] += a_real  # A's spool reaches the store
        b.exchange(grants, stored)
        stored[0] += b.spend(0.01)
        assert b.spent + a_real <= NANO
    assert b.spent + a_real == NANO  # the room A did not hold was all granted


def test_events_past_the_grants_shrink_what_is_granted(grants: GrantBook) -> None:
    """A proxy with a fail-open budget spends past its grant while the
    collector is away (flagged budget_fail_open) and dies before it is
    back; its events then show $0.40 spent on a $0.25 grant. The grants
    count what the events show: the other proxy gets only what is left of
    the limit after that $0.40 (the book counted A's $0.25 grant, and B
    spent $0.75 of its own: $1.15 of $1.00)."""
    clock = Clock()
    clock.advance(T0)
    budget = Budget("cap", 1.0, "day", fail="open")
    a, b = _Holder("a", budget, clock), _Holder("b", budget, clock)
    stored = [0]
    assert a.exchange(grants, stored) == NANO // 4
    b.exchange(grants, stored)
    a.ledger.outage = True
    a_real = a.spend(0.01, most=40)
    assert a_real == 40 * NANO // 100  # past its grant: the budget fails open
    for second in range(60):
        clock.advance(1)
        if second == 2:
            stored[0] += a_real  # A's events are stored
        b.exchange(grants, stored)
        stored[0] += b.spend(0.01)
        assert b.spent + a_real <= NANO
    assert b.spent + a_real == NANO


def test_calls_admitted_while_an_exchange_is_on_its_way_are_never_granted_again(
    grants: GrantBook,
) -> None:
    """Proxy A holds a $0.25 grant and reports $0.20 in flight; while its
    exchange is on its way it admits five calls more, up to its grant. B has
    $0.75 granted and its last $0.04 stored but not yet reported, so the
    events' estimate counts those twice. The exchange leaves A its $0.25
    (only a lowered limit takes a grant back): B is never granted the room
    A's calls hold, and the two spend $1.00 at most. (The estimate shrank
    A's grant to $0.22 with $0.25 in flight, and two collectors on one
    PostgreSQL database recorded $1.0725 of $1.00.)"""
    clock = Clock()
    clock.advance(T0)
    a, b = _Holder("a", CAP, clock), _Holder("b", CAP, clock)
    stored = [0]
    assert a.exchange(grants, stored) == NANO // 4
    for _ in range(20):  # B takes slice after slice: everything A does not hold
        if b.spent == 3 * NANO // 4:
            break
        clock.advance(0.1)
        b.exchange(grants, stored)
        stored[0] += b.spend(0.01, most=4)  # the last $0.04: stored, not reported
    assert b.spent == 3 * NANO // 4
    clock.advance(1.5)  # the events are read again
    a_holds = [a.ledger.reserve(GPT, 0.01) for _ in range(20)]
    [(name, (window, spent, busy))] = a.ledger.grant_snapshot().items()
    assert busy == NANO // 5
    a_holds += [a.ledger.reserve(GPT, 0.01) for _ in range(5)]  # the exchange is on its way
    assert all(isinstance(h, BudgetHold) for h in a_holds)
    got = grants.exchange(
        CAP, window, "a", spent=spent, busy=busy, now=clock.seconds(),
        recorded=lambda: stored[0] / NANO,
    )  # fmt: skip
    a.ledger.set_grants({name: (window, got)})
    assert got == NANO // 4
    for hold in a_holds:
        assert isinstance(hold, BudgetHold)
        hold.settle(0.01, "ok", 200)
    stored[0] += NANO // 4
    for _ in range(10):
        clock.advance(1)
        b.exchange(grants, stored)
        stored[0] += b.spend(0.01)
    assert b.spent + NANO // 4 == stored[0] == NANO


@pytest.mark.parametrize("change", ["redefined", "deleted and set again"])
def test_a_budget_redefined_or_set_again_is_not_spent_twice(grants: GrantBook, change: str) -> None:
    """A proxy spends all of a shared $1.00 budget; the budget is then
    redefined (a new scope, same name and window) or deleted and set
    again. The proxy's new account starts from what the old one spent
    and held, and from its grant (its row in the store is the same): no
    call more is admitted. (A fresh account was granted the whole grant
    again: $2.00 recorded on $1.00.)"""
    clock = Clock()
    clock.advance(T0)
    a = _Holder("a", CAP, clock)
    stored = [0]
    for _ in range(10):
        clock.advance(1.1)
        a.exchange(grants, stored)
        stored[0] += a.spend(0.01)
    held = a.ledger.reserve(GPT, 0.01)  # none fits; one in flight when it changes, had it
    assert stored[0] == NANO and not isinstance(held, BudgetHold)
    if change == "redefined":
        a.budget = Budget("cap", 1.0, "day", provider="openai")
    else:  # a poll finds it gone, the next one set again
        a.ledger.load([], {})
    a.ledger.load([a.budget], {})
    for _ in range(10):
        clock.advance(1.1)
        a.exchange(grants, stored)
        stored[0] += a.spend(0.01)
    assert stored[0] == NANO


def test_a_lowered_limit_counts_the_calls_admitted_on_the_old_grant(grants: GrantBook) -> None:
    """The limit goes from $1.00 to $0.25 while A holds a $0.25 grant and
    B $0.25, neither spent. A's poll reports nothing in flight, then admits
    $0.25 of calls on its old grant before the answer (a smaller grant)
    arrives. A reports the grant it enforces with each exchange, and the
    store keeps that as A's until A's next report: B is never granted
    the room A's calls hold ($0.46 was spent on the $0.25 limit)."""
    clock = Clock()
    clock.advance(T0)
    a, b = _Holder("a", CAP, clock), _Holder("b", CAP, clock)
    stored = [0]
    a.exchange(grants, stored)
    for _ in range(2):
        b.exchange(grants, stored)
    a.budget = b.budget = Budget("cap", 0.25, "day")
    answer = a.send(grants, stored)  # reported: nothing in flight
    admitted = a.spend(0.01)  # on the old grant, while the answer is on its way
    a.apply(answer)
    assert admitted == NANO // 4
    stored[0] += admitted
    for _ in range(30):
        clock.advance(1)
        a.exchange(grants, stored)
        b.exchange(grants, stored)
        stored[0] += b.spend(0.01) + a.spend(0.01)
    assert stored[0] == NANO // 4


def test_a_call_bigger_than_a_slice_is_granted_room(grants: GrantBook) -> None:
    """Two proxies share a $0.05 budget: a slice is $0.05 / 8 = $0.00625, and
    a call whose worst case is $0.01 was refused for ever ("this process's
    share is spent" with nothing spent). The refused call's worst case is
    reported as its want, and the next grant makes room for it while the
    limit has it."""
    clock = Clock()
    clock.advance(T0)
    small = Budget("cap", 0.05, "day")
    a, b = _Holder("a", small, clock), _Holder("b", small, clock)
    stored = [0]
    a.exchange(grants, stored)
    assert b.exchange(grants, stored) == 6_250_000
    assert b.spend(0.01) == 0  # refused: over the slice
    assert b.ledger.grant_wants() == {"cap": 10_000_000}
    assert b.exchange(grants, stored) == 10_000_000
    assert b.ledger.grant_wants() == {}  # asked for once
    assert b.spend(0.01) == 10_000_000
    for _ in range(10):  # both keep asking for room for their calls
        clock.advance(1)
        for holder in (a, b):
            holder.spend(0.01)
            holder.exchange(grants, stored)
    assert a.spent + b.spent == 5 * 10_000_000  # the whole limit, never more


def test_the_events_are_summed_at_most_once_a_second_per_budget(grants: GrantBook) -> None:
    """Every holder exchanges every second, and the store's spend sums the
    window's events: the book reads it once a second per budget and window,
    however many holders ask."""
    start = CAP.window_start(T0)
    reads: list[float] = []

    def recorded() -> float:
        reads.append(1)
        return 0.0

    for step in range(10):  # ten holders in each of ten tenths of a second
        for n in range(10):
            grants.exchange(
                CAP, start, f"h{n}", spent=0, busy=0, now=T0 + step / 10, recorded=recorded
            )
    assert len(reads) == 1
    grants.exchange(CAP, start, "h0", spent=0, busy=0, now=T0 + 1.0, recorded=recorded)
    assert len(reads) == 2


def test_the_poller_asks_for_room_and_reads_the_store_s_events(tmp_path: Path) -> None:
    """Proxies sharing a store file (C{--shared-budgets}): the poller reports
    the worst case of a call its grant refused, and the next grant makes
    room for it; an event stored later by another process (its spool)
    leaves no room to grant at its next exchange: the grant stays what
    this process holds (its calls in flight may all be spent, so it is
    never taken back), and no call more is admitted."""
    from llmobserve.collector import EventStore
    from llmobserve.proxy._budgetpoll import BudgetPoller

    path = store_with(tmp_path / "events.sqlite3", Budget("cap", 0.05, "day"))
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    poller = BudgetPoller(clock, ledger, str(path))
    poller.load_now()
    [account] = ledger.accounts()
    assert account.granted == 12_500_000  # a quarter of $0.05
    assert isinstance(ledger.reserve(GPT, 0.02), BudgetRefusal)
    poller._apply(poller._read(*poller._snapshots()))  # the read the refusal asks for
    assert account.granted == 20_000_000
    hold = ledger.reserve(GPT, 0.02)
    assert isinstance(hold, BudgetHold)
    store = EventStore(path)
    event = {
        "id": "late",
        "kind": "call",
        "ts": T0 - 1,
        "outcome": "ok",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "cost_usd": 0.04,
        "context": {},
    }
    store.insert([event])
    store.close()
    clock.advance(1.5)  # the events' spend is read again after a second
    poller._apply(poller._read(*poller._snapshots()))
    # $0.04 stored, $0.02 in flight here: nothing is granted past what it holds
    assert account.granted == 20_000_000
    assert isinstance(ledger.reserve(GPT, 0.0001), BudgetRefusal)
    hold.settle(0.02, "ok", 200)  # and its event is stored
    store = EventStore(path)
    store.insert([{**event, "id": "own", "cost_usd": 0.02}])
    store.close()
    clock.advance(1.5)
    poller._apply(poller._read(*poller._snapshots()))
    assert account.granted == 20_000_000
    assert isinstance(ledger.reserve(GPT, 0.0001), BudgetRefusal)
    poller.stopService()


def test_proxies_on_a_store_file_name_a_spent_budget_too(tmp_path: Path) -> None:
    """Proxies sharing a store file (C{--workers}, C{--shared-budgets}): the
    events' spend the grant exchange reads reaches the ledger as a
    collector's does, so a budget already past its limit refuses with its
    spend ("it is spent"), not with this process's empty share."""
    from llmobserve.collector import EventStore
    from llmobserve.proxy._budgetpoll import BudgetPoller

    path = store_with(tmp_path / "events.sqlite3", Budget("cap", 0.05, "day"))
    store = EventStore(path)
    store.insert(
        [
            {
                "id": "before",
                "kind": "call",
                "ts": T0 - 1,
                "outcome": "ok",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "cost_usd": 0.06,
                "context": {},
            }
        ]
    )
    store.close()
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    poller = BudgetPoller(clock, ledger, str(path))
    poller.load_now()
    refusal = ledger.reserve(GPT, 0.001)
    assert isinstance(refusal, BudgetRefusal)
    assert refusal.message() == (
        "budget 'cap' (day) would be exceeded: spend $0.06 + in flight $0 of limit $0.05;"
        " it is spent"
    )
    poller.stopService()
