"""A proxy with several C{--collector} URLs reads its budgets and takes its
grants from the next one when the one it reads from cannot be reached, as
its event link fails over (collectors on one PostgreSQL database keep the
same budgets and grants)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import pytest_twisted
from events.eventkit import eventually
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from llmobserve.collector import Budget
from llmobserve.proxy._budgetpoll import BudgetPoller
from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, BudgetRefusal, CallScope

T0 = 1_750_000_000.0
CAP = Budget("cap", 1.0, "day")
GPT = CallScope("openai", "gpt-4o-mini")


class _Collector(BaseHTTPRequestHandler):
    """GET /api/budgets: one budget; GET /api/limits: none; POST
    /api/budgets/grants: $0.25 of the budget."""

    def _answer(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/api/limits"):
            self._answer({"limits": []})
        else:
            self._answer({"budgets": [CAP.as_dict()]})

    #: grant exchanges answered (POST /api/budgets/grants)
    exchanges = 0

    def do_POST(self) -> None:
        type(self).exchanges += 1
        sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        grants = {r["budget"]: [r["window"], 250_000_000] for r in sent["reports"]}
        self._answer({"grants": grants})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def second() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _refused_url() -> str:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_start_up_reads_the_next_collector_when_the_first_is_down(second: str) -> None:
    """The first --collector down at start-up: the next read asks the second."""
    first = _refused_url()
    clock = Clock()
    clock.advance(T0)
    ledger = BudgetLedger(clock.seconds, shared=True)
    poller = BudgetPoller(clock, ledger, None, collector_url=first, collector_urls=[first, second])
    poller.load_now()
    assert not ledger.active
    poller.load_now()
    assert ledger.active and ledger.grant_snapshot()


@pytest_twisted.ensureDeferred
async def test_a_running_poller_moves_to_the_next_collector(second: str) -> None:
    """The budgets stayed on the first --collector while it was down: the proxy
    spent only its slice and then refused every call, though its link had
    failed over to the second collector of the same database. The poll that
    cannot reach the first reads from the second next time."""
    from twisted.internet import reactor

    first = _refused_url()
    ledger = BudgetLedger(reactor.seconds, shared=True)
    poller = BudgetPoller(
        reactor, ledger, None, collector_url=first, collector_urls=[first, second], interval=0.05
    )
    with capturedLogs() as logged:
        poller.load_now()  # start-up: the first cannot be read
        poller.startService()
        try:
            await eventually(lambda: ledger.active, what="the budgets read from the second")
            await eventually(
                lambda: isinstance(ledger.reserve(GPT, 0.01), BudgetHold),
                what="a call admitted on the second collector's grant",
            )
        finally:
            poller.stopService()
    # the log says where budgets come from now (a new user saw "unreachable",
    # then nothing, although the second collector answered)
    said = [formatEvent(e) for e in logged]
    assert f"budgets: now reading from collector {second} after 1 failed reads" in said


@pytest_twisted.ensureDeferred
async def test_next_grants_asks_for_an_exchange_now_and_fires_when_it_ends(second: str) -> None:
    """A call refused only by this process's share waits on C{next_grants()}
    (the relay): the exchange is asked for at once, not at the poll's next
    tick (an hour away here), and the wait ends when it has. A poller that
    is not running has no exchange to wait for."""
    import time

    from twisted.internet import reactor

    ledger = BudgetLedger(reactor.seconds, shared=True)
    poller = BudgetPoller(reactor, ledger, None, collector_url=second, interval=3600)
    assert poller.next_grants().called
    poller.load_now()
    poller.startService()
    try:
        before, t0 = _Collector.exchanges, time.monotonic()
        await poller.next_grants()
        assert _Collector.exchanges == before + 1
        assert time.monotonic() - t0 < 2.0
    finally:
        poller.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refusal_waits_for_the_exchange_it_started_not_the_one_after(
    second: str,
) -> None:
    """The refusal asks for an exchange at once (the ledger's C{on_low}),
    carrying the call's want; the relay's wait that follows joins that
    exchange instead of queueing behind it (two round trips inside a
    timeout sized for one)."""
    from twisted.internet import reactor

    ledger = BudgetLedger(reactor.seconds, shared=True)
    poller = BudgetPoller(reactor, ledger, None, collector_url=second, interval=3600)
    poller.load_now()
    poller.startService()
    try:
        while isinstance(ledger.reserve(GPT, 0.05), BudgetHold):  # spend the $0.25 grant
            pass
        # the top-ups asked for while it ran down (fewer than four calls left)
        await eventually(lambda: not poller._busy, what="the exchanges under way to end")
        before = _Collector.exchanges
        refused = ledger.reserve(GPT, 0.05)
        assert isinstance(refused, BudgetRefusal) and refused.share_usd is not None
        next_grants = ledger.next_grants
        assert next_grants is not None
        await next_grants()
        assert _Collector.exchanges == before + 1
    finally:
        poller.stopService()
