"""Budgets in one proxy process: reserve the worst case, refuse past a
block budget's limit, settle to the real cost (the ledger with a fake clock,
then the relay in memory)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.inmemory import InMemoryProxy
from twisted.internet.task import Clock

from llmobserve.collector import Budget, RateLimit
from llmobserve.proxy._budgets import (
    _NO_BUDGETS,
    BudgetHold,
    BudgetLedger,
    BudgetRefusal,
    CallScope,
    RateRefusal,
    _usd_header,
)
from llmobserve.transaction import Outcome

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
GPT = CallScope("openai", "gpt-4o-mini")


def ledger(*budgets: Budget, spends: dict[str, float] | None = None) -> tuple[BudgetLedger, Clock]:
    clock = Clock()
    clock.advance(T0)
    book = BudgetLedger(clock.seconds)
    book.load(budgets, spends or {})
    return book, clock


def test_two_hundred_concurrent_calls_never_overshoot() -> None:
    """200 calls in flight at once, each worth up to $0.01, against $1.00:
    exactly 100 are admitted, the rest refused, and once all settle at their
    worst case the spend is exactly the limit (overshoot $0)."""
    book, _ = ledger(Budget("cap", 1.00))
    verdicts = [book.reserve(GPT, 0.01) for _ in range(200)]
    holds = [v for v in verdicts if isinstance(v, BudgetHold)]
    refusals = [v for v in verdicts if isinstance(v, BudgetRefusal)]
    assert (len(holds), len(refusals)) == (100, 100)
    assert holds[-1].remaining == 0.0
    for hold in holds:
        hold.settle(0.01, "ok", 200)
    [account] = book.accounts()
    assert account.spent / 1e9 == 1.00 and account.reserved == 0
    assert isinstance(book.reserve(GPT, 0.000001), BudgetRefusal)
    refusal = refusals[0]
    assert refusal.detail()["name"] == "cap" and refusal.detail()["limit_usd"] == 1.0


def test_settling_releases_what_the_call_did_not_use() -> None:
    """A call reserved at $0.50 that cost $0.10 leaves $0.90 for the next."""
    book, _ = ledger(Budget("cap", 1.00))
    hold = book.reserve(GPT, 0.50)
    assert isinstance(hold, BudgetHold) and hold.remaining == 0.5
    assert isinstance(book.reserve(GPT, 0.60), BudgetRefusal)
    hold.settle(0.10, "ok", 200)
    assert isinstance(book.reserve(GPT, 0.90), BudgetHold)


@pytest.mark.parametrize(
    ("budget", "inside", "outside"),
    [
        (
            Budget("b", 1, customer="acme"),
            CallScope("openai", "m", customer="acme"),
            CallScope("openai", "m", customer="bob"),
        ),
        (
            Budget("b", 1, tenant="t1"),
            CallScope("openai", "m", tenant="t1"),
            CallScope("openai", "m", tenant="t2"),
        ),
        (
            Budget("b", 1, section="agent/plan"),
            CallScope("openai", "m", section_path="agent/plan/step"),
            CallScope("openai", "m", section_path="agent/planner"),
        ),
        (
            Budget("b", 1, provider="anthropic"),
            CallScope("anthropic", "m"),
            CallScope("openai", "m"),
        ),
        (
            Budget("b", 1, model="gpt-4o"),
            CallScope("openai", "gpt-4o"),
            CallScope("openai", "gpt-4o-mini"),
        ),
        (
            Budget("b", 1, customer="acme", model="gpt-4o"),
            CallScope("openai", "gpt-4o", customer="acme"),
            CallScope("openai", "gpt-4o-mini", customer="acme"),
        ),
        (
            Budget("b", 1, project="alpha"),
            CallScope("openai", "m", project="alpha"),
            CallScope("openai", "m", project="beta"),
        ),
        (  # a call made with no key has no project: outside every project scope
            Budget("b", 1, project="alpha"),
            CallScope("openai", "m", project="alpha"),
            CallScope("openai", "m"),
        ),
    ],
)
def test_every_scope(budget: Budget, inside: CallScope, outside: CallScope) -> None:
    """A call in the scope is refused past the limit; one outside is not counted."""
    book, _ = ledger(budget)
    assert isinstance(book.reserve(inside, 0.75), BudgetHold)
    assert isinstance(book.reserve(inside, 0.50), BudgetRefusal)
    free = book.reserve(outside, 5.0)
    assert isinstance(free, BudgetHold) and free.remaining is None


def test_windows_roll_over_with_the_clock() -> None:
    """A spent hourly budget admits calls again in the next hour; a total one never."""
    book, clock = ledger(Budget("hourly", 1.0, "hour"), spends={"hourly": 1.0})
    assert isinstance(book.reserve(GPT, 0.01), BudgetRefusal)
    clock.advance(3600 - 400)  # 16:00:00Z
    hold = book.reserve(GPT, 0.99)
    assert isinstance(hold, BudgetHold) and hold.remaining == pytest.approx(0.01)
    total, clock2 = ledger(Budget("all", 1.0, "total"), spends={"all": 1.0})
    clock2.advance(86400 * 400)
    assert isinstance(total.reserve(GPT, 0.01), BudgetRefusal)


def test_a_call_from_the_previous_window_settles_nowhere() -> None:
    """Its cost belongs to the window it started in (its event's ts), not the new one."""
    book, clock = ledger(Budget("hourly", 1.0, "hour"))
    hold = book.reserve(GPT, 0.9)
    assert isinstance(hold, BudgetHold)
    clock.advance(3600)
    hold.settle(0.9, "ok", 200)
    assert isinstance(book.reserve(GPT, 1.0), BudgetHold)


def test_a_window_rolled_by_another_scope_is_seen_by_every_scope() -> None:
    """Two call scopes share one hourly budget; each keeps its own cached
    list of accounts. When the hour ends and the first call of the new
    hour comes from the other scope, this scope's next call still counts in
    the new hour, and a hold from the old hour settles nowhere."""
    book, clock = ledger(Budget("hourly", 1.0, "hour"), spends={"hourly": 0.5})
    acme = CallScope("openai", "gpt-4o-mini", customer="acme")
    old = book.reserve(GPT, 0.4)
    assert isinstance(old, BudgetHold) and isinstance(book.reserve(acme, 0.2), BudgetRefusal)
    clock.advance(3600 - 400)  # 16:00:00Z: a new hour
    assert isinstance(book.reserve(acme, 0.3), BudgetHold)
    hold = book.reserve(GPT, 0.7)  # 0.3 + 0.7: exactly the limit of the new hour
    assert isinstance(hold, BudgetHold) and hold.remaining == 0.0
    old.settle(0.4, "ok", 200)  # its hour is over
    assert isinstance(book.reserve(GPT, 0.000001), BudgetRefusal)
    hold.settle(0.6, "ok", 200)  # a hold of the new hour settles in it
    [account] = book.accounts()
    assert (account.spent, account.reserved) == (600_000_000, 300_000_000)


def test_a_new_cap_keeps_what_is_spent_and_reserved() -> None:
    """A shared budget's grant (or a budget's limit) changes while calls are
    in flight: what they reserve and what was spent stay as they were, only
    the room left moves with the cap."""
    book = BudgetLedger(lambda: T0, shared=True)
    book.load([Budget("cap", 10.0)], {})
    book.set_grants({"cap": (book.accounts()[0].window_start, 2_000_000_000)})
    hold = book.reserve(GPT, 0.5)
    assert isinstance(hold, BudgetHold) and hold.remaining == 1.5
    hold.settle(0.25, "ok", 200)
    held = book.reserve(GPT, 0.5)
    assert isinstance(held, BudgetHold)
    [account] = book.accounts()
    book.set_grants({"cap": (account.window_start, 5_000_000_000)})
    assert (account.spent, account.reserved, account.free) == (
        250_000_000,
        500_000_000,
        4_250_000_000,
    )
    book.load([Budget("cap", 3.0)], {})  # the same budget, a lower limit than the grant
    assert (account.spent, account.reserved, account.free) == (
        250_000_000,
        500_000_000,
        2_250_000_000,
    )
    held.settle(0.5, "ok", 200)
    assert (account.spent, account.reserved) == (750_000_000, 0)


def hold(verdict: BudgetHold | BudgetRefusal | RateRefusal) -> BudgetHold:
    assert isinstance(verdict, BudgetHold), verdict
    return verdict


def test_holds_settle_the_same_before_and_after_their_plan_is_retired() -> None:
    """A scope's plan is retired by every load and every rolled window;
    holds taken on it settle on the accounts that still count them (a load
    that keeps the budget), and on none whose window is over."""
    book, clock = ledger(Budget("day", 10.0, "day"), Budget("hour", 10.0, "hour"))
    before = [hold(book.reserve(GPT, 1.0)) for _ in range(2)]
    book.load([Budget("day", 10.0, "day"), Budget("hour", 10.0, "hour")], {})
    after = hold(book.reserve(GPT, 1.0))
    day, hour = book.accounts()
    assert (day.reserved, hour.reserved) == (3_000_000_000, 3_000_000_000)
    before[0].settle(0.5, "ok", 200)  # retired by the load: account by account
    after.settle(0.25, "ok", 200)  # current: its plan's accounts at once
    assert (day.spent, day.reserved) == (750_000_000, 1_000_000_000)
    assert (hour.spent, hour.reserved) == (750_000_000, 1_000_000_000)
    clock.advance(3600)  # the hour rolls (the day does not): on the next call
    assert isinstance(book.reserve(GPT, 0.0), BudgetHold)
    before[1].settle(1.0, "ok", 200)  # counts in the day, not in the new hour
    assert (day.spent, day.reserved) == (1_750_000_000, 0)
    assert (hour.spent, hour.reserved, hour.free) == (0, 0, 10_000_000_000)


def test_the_remaining_header_is_rounded_down_to_the_micro_dollar() -> None:
    """Six decimals, rounded down, from whole nano-dollars; never negative;
    a call past a warn budget is held once on every budget."""
    book, _ = ledger(Budget("cap", 1.0), Budget("warn", 0.1, action="warn"))
    hold = book.reserve(GPT, 0.0000015)
    assert isinstance(hold, BudgetHold) and hold.remaining_header() == b"0.099998"
    over = book.reserve(GPT, 0.5)
    assert isinstance(over, BudgetHold) and over.flags == ("budget_warn:warn",)
    assert over.remaining_header() == b"0.000000"
    assert BudgetHold.of(_NO_BUDGETS, 0, None).remaining_header() is None
    # each budget holds both calls once (the warn budget's flag is found
    # after the first budget held the call: that hold is undone, then redone)
    assert [a.reserved for a in book.accounts()] == [500_001_500, 500_001_500]


@settings(max_examples=2000)
@given(
    st.one_of(
        st.integers(min_value=-(10**12), max_value=10**19),
        st.integers(min_value=10**12 - 10**7, max_value=10**12 + 10**7),
        st.sampled_from([-1, 0, 999, 1000, 10**12 - 1, 10**12, 10**18, 2**53, 2**63]),
    )
)
def test_the_remaining_header_is_the_exact_micro_dollars_of_any_amount(left: int) -> None:
    """The header's fast form (from tables of digits, below $1,000) gives
    the same digits as whole-number arithmetic, and the slow one past it,
    up to the largest amounts; never negative."""
    micro = max(left, 0) // 1000
    assert _usd_header(left) == b"%d.%06d" % divmod(micro, 1_000_000)
    assert BudgetHold.of(_NO_BUDGETS, 0, left).header == _usd_header(left)


@settings(max_examples=300)
@given(
    limit=st.one_of(st.floats(0.001, 2_000.0), st.sampled_from([999.999999, 1_000.0, 1_000.01])),
    cost=st.floats(1e-9, 0.5),
    settled=st.floats(0.0, 0.5),
)
def test_a_call_held_on_an_allotment_gets_the_header_of_its_room(
    limit: float, cost: float, settled: float
) -> None:
    """The common case (a call held on its scope's allotment) makes its
    header inline: the digits _usd_header gives for the room left, on
    either side of the tables' $1,000."""
    book, _ = ledger(Budget("cap", limit))
    for _ in range(4):
        hold = book.reserve(GPT, cost)
        if not isinstance(hold, BudgetHold):
            return
        assert hold.header == _usd_header(hold._left or 0)
        hold.settle(min(settled, cost), "ok", 200)


def test_unknown_prices_follow_the_budget_choice() -> None:
    """No price: allowed and flagged by default, refused with unpriced=block,
    and refused by any block budget that is already spent."""
    book, _ = ledger(Budget("cap", 1.0))
    hold = book.reserve(GPT, None)
    assert isinstance(hold, BudgetHold) and hold.flags == ("budget_unpriced",)
    strict, _ = ledger(Budget("cap", 1.0, unpriced="block"))
    refusal = strict.reserve(GPT, None)
    assert isinstance(refusal, BudgetRefusal) and "no price" in refusal.message()
    spent, _ = ledger(Budget("cap", 1.0), spends={"cap": 1.0})
    assert isinstance(spent.reserve(GPT, None), BudgetRefusal)


def test_warn_budgets_let_calls_through_flagged() -> None:
    """A warn budget never refuses; the call past it is flagged with its name."""
    book, _ = ledger(Budget("soft", 0.01, action="warn"))
    hold = book.reserve(GPT, 0.05)
    assert isinstance(hold, BudgetHold) and hold.flags == ("budget_warn:soft",)


def test_unpriced_ends_settle_by_what_reached_the_upstream() -> None:
    """No price: a call the upstream refused (status >= 400) or that never went
    out is released; one that was answered keeps its worst case as spent."""
    book, _ = ledger(Budget("cap", 1.0))
    for outcome, status in (("upstream_error", 500), ("proxy_error", 502), ("refused", 403)):
        hold = book.reserve(GPT, 0.6)
        assert isinstance(hold, BudgetHold)
        hold.settle(None, outcome, status)
    hold = book.reserve(GPT, 0.6)
    assert isinstance(hold, BudgetHold)
    hold.settle(None, "ok", 200)
    assert isinstance(book.reserve(GPT, 0.6), BudgetRefusal)
    assert isinstance(book.reserve(GPT, 0.4), BudgetHold)


def test_tightest_budget_is_the_remaining_figure() -> None:
    """X-LLMObserve-Budget-Remaining is the smallest remainder of the call's budgets."""
    book, _ = ledger(Budget("wide", 100.0), Budget("narrow", 2.0, model="gpt-4o-mini"))
    hold = book.reserve(GPT, 0.5)
    assert isinstance(hold, BudgetHold) and hold.remaining == 1.5


def test_reloading_keeps_live_spend_and_starts_new_budgets_from_the_store() -> None:
    """A changed limit keeps what was spent and reserved; a new or rescoped
    budget starts from the store's figure; a deleted one stops counting."""
    book, _ = ledger(Budget("cap", 1.0))
    hold = book.reserve(GPT, 0.8)
    assert isinstance(hold, BudgetHold)
    book.load([Budget("cap", 1.5)], {"cap": 0.0})
    assert isinstance(book.reserve(GPT, 0.8), BudgetRefusal)
    assert isinstance(book.reserve(GPT, 0.7), BudgetHold)
    book.load([Budget("cap", 1.5, customer="acme")], {"cap": 1.4})
    hold.settle(0.8, "ok", 200)  # counted by the store, not by the new account
    assert isinstance(book.reserve(CallScope("openai", "m", customer="acme"), 0.2), BudgetRefusal)
    book.load([], {})
    assert not book.active


# -- the relay ------------------------------------------------------------------

CHAT = b"/v1/chat/completions"
TARGET = b"X-LLMObserve-Target-URL: http://127.0.0.1:8080" + CHAT + b"\r\n"


def budgeted_proxy(*budgets: Budget, server: str = "lean") -> InMemoryProxy:
    proxy = InMemoryProxy(provider_hosts={"127.0.0.1:8080": "openai"}, server=server)
    book = BudgetLedger(proxy.reactor.seconds)
    book.load(budgets, {})
    proxy.services.budgets = book
    return proxy


def chat_request(max_tokens: int, headers: bytes = b"") -> bytes:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    return (
        b"POST /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
        + TARGET
        + headers
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
def test_a_refused_call_gets_402_and_never_reaches_the_upstream(server: str) -> None:
    """402, X-LLMObserve-Error: budget_exceeded, a JSON body naming the budget,
    window, spend and limit; no upstream connection; outcome budget_refused."""
    proxy = budgeted_proxy(Budget("tiny", 0.0001, "day"), server=server)
    channel, transport = proxy.client()
    channel.dataReceived(chat_request(10_000))
    proxy.reactor.advance(0)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 402 ")
    assert b"x-llmobserve-error: budget_exceeded" in out.lower()
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    detail = body["error"]["budget"]
    assert body["error"]["type"] == "budget_exceeded"
    assert (detail["name"], detail["window"], detail["spend_usd"], detail["limit_usd"]) == (
        "tiny",
        "day",
        0.0,
        0.0001,
    )
    assert detail["worst_case_usd"] > 0.0001
    assert proxy.connects() == 0
    [txn] = proxy.sink.transactions
    assert txn.outcome is Outcome.BUDGET_REFUSED and txn.status == 402
    assert txn.budget_hold is None


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
def test_an_allowed_call_carries_the_remaining_budget(server: str) -> None:
    """The response of an admitted call says what is left (its worst case
    reserved), and its transaction carries the hold to settle."""
    proxy = budgeted_proxy(Budget("cap", 1.0), server=server)
    channel, transport = proxy.client()
    channel.dataReceived(chat_request(100, b"X-LLMObserve-Customer-ID: acme\r\n"))
    proxy.reactor.advance(0)
    upstream = proxy.accept_upstream()
    assert b"POST /v1/chat/completions" in upstream.received()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 ")
    line = [x for x in out.split(b"\r\n") if x.lower().startswith(b"x-llmobserve-budget")]
    remaining = float(line[0].split(b": ")[1])
    assert 0.999 < remaining < 1.0
    [txn] = proxy.sink.transactions
    assert isinstance(txn.budget_hold, BudgetHold)


def test_no_budgets_no_check() -> None:
    """With no budget defined, calls connect at header time as before."""
    proxy = budgeted_proxy()
    channel, _ = proxy.client()
    head = chat_request(100).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    channel.dataReceived(head)  # body not sent yet
    proxy.reactor.advance(0)
    assert proxy.connects() == 1


# -- rate limits ------------------------------------------------------------------


def rates(*limits: RateLimit) -> tuple[BudgetLedger, Clock]:
    book, clock = ledger()
    book.load_limits(limits)
    return book, clock


def test_calls_per_minute_counts_calls_in_flight_and_rolls_each_minute() -> None:
    """100 calls at once against 10 a minute: exactly 10 admitted; the rest get
    a 429 refusal that says when the minute ends; the next minute admits again."""
    book, clock = rates(RateLimit("rpm", 10))
    verdicts = [book.reserve(GPT, 0.001, 50) for _ in range(100)]
    assert sum(isinstance(v, BudgetHold) for v in verdicts) == 10
    refusal = verdicts[-1]
    assert isinstance(refusal, RateRefusal) and refusal.status == 429
    assert refusal.retry_after == 20  # T0 is 40 s into its minute
    assert refusal.detail()["per_minute"] == 10 and "10 calls per minute" in refusal.message()
    clock.advance(20)
    assert isinstance(book.reserve(GPT, 0.001, 50), BudgetHold)


def test_a_call_never_sent_does_not_count_against_a_calls_limit() -> None:
    """Released when it never reached the upstream; counted once it did."""
    book, _ = rates(RateLimit("rpm", 1))
    hold = book.reserve(GPT, None, None)
    assert isinstance(hold, BudgetHold)
    hold.settle(None, "proxy_error", 502)
    hold = book.reserve(GPT, None, None)
    assert isinstance(hold, BudgetHold)
    hold.settle(None, "upstream_error", 500)
    assert isinstance(book.reserve(GPT, None, None), RateRefusal)


def test_tokens_per_minute_reserve_the_bound_and_settle_to_the_real_count() -> None:
    """A call's most tokens are held; its real tokens (its event's usage,
    input + output) count once settled; a call with no token bound is let
    through flagged until the minute is used up."""
    book, _ = rates(RateLimit("tpm", 1000, unit="tokens"))
    hold = book.reserve(GPT, 0.001, 800)
    assert isinstance(hold, BudgetHold)
    assert isinstance(book.reserve(GPT, 0.001, 300), RateRefusal)
    hold.settle(0.0001, "ok", 200, usage={"input_tokens": 60, "output_tokens": 40})
    second = book.reserve(GPT, 0.001, 300)
    assert isinstance(second, BudgetHold)
    unbounded = book.reserve(GPT, None, None)
    assert isinstance(unbounded, BudgetHold) and "rate_unbounded" in unbounded.flags
    unbounded.settle(None, "ok", 200, usage={"output_tokens": 600})
    second.settle(0.0001, "ok", 200, usage={"input_tokens": 300})
    assert isinstance(book.reserve(GPT, None, None), RateRefusal)


def test_rate_limits_have_scopes_and_a_budget_refusal_releases_them() -> None:
    """A customer's limit leaves other customers alone; a call a budget refuses
    holds nothing on the rate limits it passed."""
    book, _ = rates(RateLimit("acme", 1, customer="acme"))
    acme = CallScope("openai", "m", customer="acme")
    book.load([Budget("cap", 0.5)], {})
    assert isinstance(book.reserve(acme, 0.9, 10), BudgetRefusal)
    assert isinstance(book.reserve(acme, 0.1, 10), BudgetHold)
    assert isinstance(book.reserve(acme, 0.1, 10), RateRefusal)
    assert isinstance(book.reserve(CallScope("openai", "m", customer="bob"), 0.1, 10), BudgetHold)


def test_a_project_rate_limit_counts_that_project_s_calls_only() -> None:
    """A limit scoped to a project counts calls made with that project's keys;
    another project's calls and calls with no key pass it."""
    book, _ = rates(RateLimit("alpha", 1, project="alpha"))
    alpha = CallScope("openai", "m", project="alpha")
    assert isinstance(book.reserve(alpha, 0.1, 10), BudgetHold)
    assert isinstance(book.reserve(alpha, 0.1, 10), RateRefusal)
    assert isinstance(book.reserve(CallScope("openai", "m", project="beta"), 0.1, 10), BudgetHold)
    assert isinstance(book.reserve(CallScope("openai", "m"), 0.1, 10), BudgetHold)


def test_a_rate_limited_call_gets_429_with_retry_after() -> None:
    """429, X-LLMObserve-Error: rate_limited, Retry-After, the limit in the body;
    nothing upstream; outcome budget_refused."""
    proxy = budgeted_proxy()
    assert proxy.services.budgets is not None
    proxy.services.budgets.load_limits([RateLimit("none", 0)])
    channel, transport = proxy.client()
    channel.dataReceived(chat_request(10))
    proxy.reactor.advance(0)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 429 ")
    assert b"x-llmobserve-error: rate_limited" in out.lower()
    assert b"retry-after: " in out.lower()
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["limit"]["name"] == "none"
    assert proxy.connects() == 0
    [txn] = proxy.sink.transactions
    assert txn.outcome is Outcome.BUDGET_REFUSED and txn.error == "rate_limited"


def test_start_up_loads_spend_and_minute_usage_from_the_store(tmp_path: Any) -> None:
    """The poller's first load (what a restart does) takes each budget's spend
    and each rate limit's use of the current minute from the store file."""
    from llmobserve.collector import EventStore, SQLiteBudgetBook
    from llmobserve.proxy._budgetpoll import BudgetPoller

    path = tmp_path / "events.sqlite3"
    store = EventStore(path)
    event = {
        "id": "e1",
        "kind": "call",
        "ts": T0 - 1,
        "outcome": "ok",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "cost_usd": 0.99,
        "usage": {"input_tokens": 10},
        "context": {},
    }
    store.insert([event])
    store.close()
    book = SQLiteBudgetBook(path)
    book.set(Budget("cap", 1.0, "day"))
    book.limits.set(RateLimit("rpm", 2))
    book.close()
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds)
    BudgetPoller(clock, ledger, str(path)).load_now()
    assert isinstance(ledger.reserve(GPT, 0.02, 10), BudgetRefusal)  # $0.99 spent already
    assert isinstance(ledger.reserve(GPT, 0.005, 10), BudgetHold)  # 2nd call this minute
    assert isinstance(ledger.reserve(GPT, 0.001, 10), RateRefusal)


def test_a_refusal_gives_the_worst_case_as_held_in_whole_nano_dollars() -> None:
    """The 402 body's C{worst_case_usd} is what the ledger would hold:
    rounded up to the nano-dollar, without the price product's float noise."""
    budget = Budget("tiny", 0.0001, "day")
    noisy = 0.1 + 0.2  # 0.30000000000000004
    assert noisy != 0.3
    detail = BudgetRefusal(budget, 0.0, 0.0, noisy, "this call could cost up to").detail()
    assert detail["worst_case_usd"] == 0.3
    held = BudgetRefusal(budget, 0.0, 0.0, 1.0000000001, "this call could cost up to").detail()
    assert held["worst_case_usd"] == 1.000000001  # rounded up, as reserved
    assert BudgetRefusal(budget, 0.0, 0.0, None, "no price").detail()["worst_case_usd"] is None
