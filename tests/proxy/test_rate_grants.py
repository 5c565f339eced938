"""Rate limits shared by several processes (proxies on one collector, or on
one store file): each uses only the slices of a minute's calls or tokens
the store grants it (budget_grants, in C{rate:MINUTE} windows), so together
they never pass the limit.

The C{grants} fixture is a SQLite file's and a PostgreSQL database's (a
real server, tests/support/postgres.py): both keep the grants' contract."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from llmobserve.collector import GrantBook, RateLimit
from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, CallScope, RateRefusal

MINUTE = 1_749_999_960.0  # a UTC minute's start
T0 = MINUTE + 20  # 20 s into it
GPT = CallScope("openai", "gpt-4o-mini")
RPM = RateLimit("rpm", 40)


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


def _rows(grants: GrantBook) -> list[tuple[str, str, str]]:
    rows = grants._db.execute('SELECT budget, "window", holder FROM budget_grants').fetchall()
    return sorted((str(b), str(w), str(h)) for b, w, h in rows)


def test_rate_grants_never_sum_past_the_limit_and_old_minutes_go(grants: GrantBook) -> None:
    """A minute's first grant records the store's count so far (read once);
    holders get slices of the rest, never more than the limit together; a
    budget of the same name keeps rows of its own; a minute's first grant
    drops the rows of minutes over by more than one."""
    a = grants.exchange_rate(RPM, MINUTE, "a", used=0, busy=0, now=T0, recorded=lambda: 4)
    b = grants.exchange_rate(RPM, MINUTE, "b", used=0, busy=0, now=T0, recorded=lambda: 99)
    assert (a, b) == (10, 5)  # a quarter of the limit per live holder
    for i in range(30):  # both use all they get, then ask again
        a = grants.exchange_rate(RPM, MINUTE, "a", used=a, busy=a, now=T0 + i, recorded=lambda: 0)
        b = grants.exchange_rate(RPM, MINUTE, "b", used=b, busy=b, now=T0 + i, recorded=lambda: 0)
        assert 4 + a + b <= 40
    assert 4 + a + b == 40
    later = MINUTE + 120.0
    grants.exchange_rate(RPM, later, "a", used=0, busy=0, now=later, recorded=lambda: 0)
    windows = {w for name, w, _ in _rows(grants) if name == "rpm"}
    assert windows == {f"rate:{later!r}"}


def test_a_shared_ledger_uses_only_its_rate_grant_and_takes_the_next_minute_ahead() -> None:
    """Nothing passes a shared limit before a grant; past the grant a call is
    refused as this process's share, asks for more at once, and is told to
    retry in a second; in the last seconds of a minute the snapshot asks
    for the next one, whose grant applies as soon as it begins."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    asked: list[int] = []
    ledger.on_low = lambda: asked.append(1)
    ledger.load_limits([RPM], {"rpm": 30})  # shared: the store's count is in the grants
    refusal = ledger.reserve(GPT, 0.001)
    assert isinstance(refusal, RateRefusal) and refusal.retry_after == 1
    assert "this process's share" in refusal.message() and asked
    assert ledger.rate_grant_snapshot(T0) == [("rpm", MINUTE, 0, 0, 1)]
    ledger.set_rate_grants({"rpm": [(MINUTE, 3)]})
    holds = [ledger.reserve(GPT, 0.001) for _ in range(5)]
    assert [isinstance(h, BudgetHold) for h in holds] == [True, True, True, False, False]
    for hold in holds[:3]:
        assert isinstance(hold, BudgetHold)
        hold.settle(0.001, "ok", 200)
    clock.advance(MINUTE + 58 - T0)
    assert ledger.rate_grant_snapshot(clock.seconds()) == [
        ("rpm", MINUTE, 3, 3, 1),  # two calls were refused since the grant
        ("rpm", MINUTE + 60, 0, 0, 0),
    ]
    ledger.set_rate_grants({"rpm": [(MINUTE, 3), (MINUTE + 60, 2)]})
    clock.advance(3)  # the next minute: its grant was taken ahead
    holds = [ledger.reserve(GPT, 0.001) for _ in range(3)]
    assert [isinstance(h, BudgetHold) for h in holds] == [True, True, False]


def test_two_shared_ledgers_never_pass_a_calls_limit(grants: GrantBook) -> None:
    """Two processes' ledgers exchanging with one grant table as their
    pollers do, a call every 10 ms each against 40 calls per minute: never
    more than 40 admitted in the minute (overshoot 0)."""
    clock = Clock()
    clock.advance(T0)
    ledgers = [BudgetLedger(clock.seconds, shared=True) for _ in range(2)]
    for ledger in ledgers:
        ledger.load_limits([RPM], {})
    admitted = 0
    for step in range(1000):
        for n, ledger in enumerate(ledgers):
            if step % 7 == n:  # the poller's exchange
                for name, minute, used, busy, want in ledger.rate_grant_snapshot(clock.seconds()):
                    got = grants.exchange_rate(
                        RPM,
                        minute,
                        f"p{n}",
                        used=used,
                        busy=busy,
                        now=clock.seconds(),
                        recorded=lambda: 0,
                        want=want,
                    )
                    ledger.set_rate_grants({name: [(minute, got)]})
            hold = ledger.reserve(GPT, 0.001)
            if isinstance(hold, BudgetHold):
                admitted += 1
                hold.settle(0.001, "ok", 200)
        clock.advance(0.01)
    assert 30 <= admitted <= 40


def test_a_call_bigger_than_a_slice_of_a_tokens_limit_is_granted_room(
    grants: GrantBook,
) -> None:
    """A call's worst case over a slice of a tokens limit (a quarter of it
    per live process) is refused once, and the exchange that follows grants
    this process room for it when the limit has it: it passes next time;
    one bigger than what is left never does."""
    tpm = RateLimit("tpm", 1000, unit="tokens")
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    ledger.load_limits([tpm], {})

    def exchange() -> None:
        for name, minute, used, busy, want in ledger.rate_grant_snapshot(clock.seconds()):
            got = grants.exchange_rate(
                tpm, minute, "p", used=used, busy=busy, now=T0, recorded=lambda: 0, want=want
            )
            ledger.set_rate_grants({name: [(minute, got)]})

    exchange()  # a slice: 250 tokens
    assert isinstance(ledger.reserve(GPT, 0.001, tokens=600), RateRefusal)
    exchange()  # asks for room for 600
    hold = ledger.reserve(GPT, 0.001, tokens=600)
    assert isinstance(hold, BudgetHold)
    hold.settle(0.001, "ok", 200, usage={"input_tokens": 500, "output_tokens": 100})
    exchange()
    assert isinstance(ledger.reserve(GPT, 0.001, tokens=500), RateRefusal)
    exchange()  # 400 left in the minute: never room for 500
    assert isinstance(ledger.reserve(GPT, 0.001, tokens=500), RateRefusal)
    assert isinstance(ledger.reserve(GPT, 0.001, tokens=400), BudgetHold)


def test_during_an_outage_a_rate_limit_applies_its_fail_mode() -> None:
    """With the collector unreachable, a fail-closed limit admits only what
    its grant holds; a fail-open one lets calls through, flagged."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    ledger.load_limits([RPM], {})
    ledger.set_rate_grants({"rpm": [(MINUTE, 2)]})
    ledger.outage = True
    holds = [ledger.reserve(GPT, 0.001) for _ in range(3)]
    assert [isinstance(h, BudgetHold) for h in holds] == [True, True, False]
    ledger.load_limits([RateLimit("rpm", 40, fail="open")], {})
    hold = ledger.reserve(GPT, 0.001)
    assert isinstance(hold, BudgetHold) and hold.flags == ("rate_fail_open",)
    ledger.outage = False
    assert isinstance(ledger.reserve(GPT, 0.001), RateRefusal)  # back to its grant


def test_an_unshared_limit_still_waits_for_its_minute() -> None:
    """One process (no sharing): the store's count at load counts, and a
    refusal says to retry when the minute ends."""
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds)
    ledger.load_limits([RateLimit("rpm", 3)], {"rpm": 2})
    assert isinstance(ledger.reserve(GPT, 0.001), BudgetHold)
    refusal = ledger.reserve(GPT, 0.001)
    assert isinstance(refusal, RateRefusal) and refusal.retry_after == 40
    assert "share" not in refusal.message()
