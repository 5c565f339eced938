"""L{BudgetPoller}: the budgets, rate limits and grants a proxy's ledger runs on.

At start-up (synchronously: a restart never resets a budget) and then every
second in a thread of its own, it reads the definitions and the spend so far
from the store file, or from the collector's C{/api/budgets} and
C{/api/limits}, into the L{BudgetLedger}; for shared budgets and rate
limits it also reports this process's spend (calls, tokens) and takes its
grants (C{budget_grants}: L{GrantBook} on a store file, C{POST
/api/budgets/grants} on a collector; a limit's next minute ahead of it).
With several C{--collector} URLs
(collectors on one PostgreSQL database) it reads from one and, after a
read that cannot reach it, from the next, as the event link fails over.
"""

from __future__ import annotations

import json
import math
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from llmobserve.collector import Budget, GrantBook, RateLimit, SQLiteBudgetBook
from llmobserve.proxy._budgets import BudgetLedger

__all__ = ["BudgetPoller"]

_log = Logger()

_Read = tuple[
    tuple[Budget, ...],
    dict[str, float],
    tuple[RateLimit, ...],
    dict[str, int],
    dict[str, tuple[float, int]],
    dict[str, list[tuple[float, int]]],
    dict[str, tuple[float | None, float]],
]
#: shared rate limits' reports: (name, minute, used, used + in flight, wanted)
_RateReports = Sequence[tuple[str, float, int, int, int]]


class BudgetPoller(Service):
    """Loads the budgets and their spend from the store at start-up, then
    every C{interval} seconds (in a thread of its own), into the ledger.

    With a shared ledger (C{ledger.shared}), each read also reports this
    process's spend to the store's C{budget_grants} and takes its grant
    (L{GrantBook}); the ledger asks for a read at once when a grant runs
    low (C{ledger.on_low}).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        ledger: BudgetLedger,
        store_path: str | None,
        *,
        collector_url: str | None = None,
        collector_urls: Sequence[str] = (),
        collector_key: str | None = None,
        ca_file: str | None = None,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self._reactor = reactor
        #: the link key (C{--collector-key}) also reads the collector's
        #: budgets and takes this process's grants, when keys are required
        self._collector_key = collector_key
        self._tls = ssl.create_default_context()
        if ca_file is not None:  # C{--collector-ca-file}: a private CA, added
            self._tls.load_verify_locations(cafile=ca_file)
        self.ledger = ledger
        self._path = store_path
        self._collector = collector_url.rstrip("/") if collector_url else None
        #: every --collector, in order: a read that cannot reach one moves on
        self._collectors = [u.rstrip("/") for u in collector_urls] or (
            [self._collector] if self._collector else []
        )
        self._timeout = timeout
        self._interval = interval
        self._book: SQLiteBudgetBook | None = None
        self._grants: GrantBook | None = None
        self.holder = uuid.uuid4().hex[:16]  # this process, in budget_grants
        self._known: tuple[Budget, ...] | None = None
        self._known_limits: tuple[RateLimit, ...] = ()
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="llmobserve-budgets")
        self._loop: LoopingCall | None = None
        self._busy = False
        self._outages = 0
        #: the collector the last successful read came from (said in the log
        #: when reads come back, from it or from the next one)
        self._read_from = self._collector
        self._no_limits_route = False
        #: calls waiting for the next grant exchange (L{next_grants})
        self._waiters: list[Deferred[None]] = []
        #: the exchange under way: its waiters, and the ledger's C{asks}
        #: when its snapshot was taken (a refusal up to it is in that one)
        self._inflight: list[Deferred[None]] = []
        self._asks_sent = -1
        if ledger.shared:
            ledger.on_low = self.kick
            ledger.next_grants = self.next_grants

    def load_now(self) -> None:
        """Load once, synchronously (start-up: a restart never resets a budget;
        shared budgets get their first grant here). A collector that does not
        answer, or a store file that cannot be opened, is logged and asked
        again every second: observation never stops traffic, so the proxy
        starts and forwards (spooling its events) while no budget is known."""
        try:
            self._apply(self._read({}))
            if self.ledger.shared:  # the accounts exist now: report and take grants
                self._apply(self._read(*self._snapshots()))
        except Exception as e:
            self._book = None
            _log.warn(
                "budgets: {where} cannot be read ({error}); no budget applies until it can,"
                " asking again every second",
                where=f"collector {self._collector}" if self._collector else f"store {self._path}",
                error=e,
            )
            if isinstance(e, OSError | ValueError):
                if self._collector is not None:
                    self._outages += 1  # so the read that works is logged
                self._next_collector()

    def _snapshots(
        self,
    ) -> tuple[dict[str, tuple[float, int, int]], _RateReports, dict[str, int], dict[str, int]]:
        """What this process reports of its shared budgets and rate limits
        (and the most a call refused by a budget's grant could cost, and
        what it may spend until its next grant is applied)."""
        ledger = self.ledger
        return (
            ledger.grant_snapshot(),
            ledger.rate_grant_snapshot(ledger.now()),
            ledger.grant_wants(),
            ledger.grant_caps(),
        )

    def _read(
        self,
        snapshot: dict[str, tuple[float, int, int]],
        rates: _RateReports = (),
        wants: dict[str, int] | None = None,
        caps: dict[str, int] | None = None,
    ) -> _Read:
        wants, caps = wants or {}, caps or {}
        if self._collector is not None:
            return self._read_collector(snapshot, rates, wants, caps)
        if self._book is None:
            assert self._path is not None
            self._book = SQLiteBudgetBook(self._path)
        book = self._book
        limits = tuple(book.limits.list())
        fresh_limits = [
            r
            for r in limits
            if not any(k.name == r.name and k.counts_same(r) for k in self._known_limits)
        ]
        budgets = tuple(book.list())
        known = self._known or ()
        fresh = [
            b for b in budgets if not any(k.name == b.name and k.counts_same(b) for k in known)
        ]
        now = self.ledger.now()
        used = {r.name: book.used(r, now) for r in fresh_limits}
        grants: dict[str, tuple[float, int]] = {}
        recorded: dict[str, tuple[float | None, float]] = {}
        if self.ledger.shared and snapshot:
            if self._grants is None:
                self._grants = GrantBook(book.connection)
            for budget in budgets:
                mine = snapshot.get(budget.name)
                if budget.action != "block" or mine is None:
                    continue
                window, spent, busy = mine
                granted = self._grants.exchange(
                    budget,
                    window,
                    self.holder,
                    spent=spent,
                    busy=busy,
                    now=now,
                    recorded=partial(book.spend, budget, now),
                    want=wants.get(budget.name, 0),
                    cap=caps.get(budget.name),
                )
                grants[budget.name] = (window, granted)
                seen = self._grants.recorded(budget, window)
                if seen is not None:  # every process's spend: a spent budget says so
                    recorded[budget.name] = (None if window == -math.inf else window, seen / 1e9)
        rate_grants: dict[str, list[tuple[float, int]]] = {}
        if self.ledger.shared and rates:
            if self._grants is None:
                self._grants = GrantBook(book.connection)
            by_name = {r.name: r for r in limits}
            for name, minute, own, busy, want in rates:
                rule = by_name.get(name)
                if rule is None:
                    continue
                got = self._grants.exchange_rate(
                    rule,
                    minute,
                    self.holder,
                    used=own,
                    busy=busy,
                    now=now,
                    recorded=partial(book.used, rule, minute),
                    want=want,
                )
                rate_grants.setdefault(name, []).append((minute, got))
        spends = {b.name: book.spend(b, now) for b in fresh}
        return budgets, spends, limits, used, grants, rate_grants, recorded

    def _read_collector(
        self,
        snapshot: dict[str, tuple[float, int, int]],
        rates: _RateReports,
        wants: dict[str, int],
        caps: dict[str, int],
    ) -> _Read:
        """The collector's budgets (C{GET /api/budgets}), rate limits (C{GET
        /api/limits}) and this process's grants (C{POST
        /api/budgets/grants}); raises when it cannot be reached, so the
        ledger keeps what it had (its grants included)."""
        rows = self._http("GET", "/api/budgets")["budgets"]
        fields = set(Budget.__dataclass_fields__)
        budgets = tuple(Budget.from_dict({k: v for k, v in r.items() if k in fields}) for r in rows)
        # every process's spend, as the store sums it (a refusal by a budget
        # already spent says so)
        recorded = {
            r["name"]: (r.get("window_start"), float(r["spend_usd"]))
            for r in rows
            if isinstance(r.get("spend_usd"), int | float)
        }
        limits = self._collector_limits()
        grants: dict[str, tuple[float, int]] = {}
        rate_grants: dict[str, list[tuple[float, int]]] = {}
        if snapshot or rates:
            reports: list[dict[str, Any]] = [
                {"budget": name, "window": window, "spent": spent, "busy": busy}
                for name, (window, spent, busy) in snapshot.items()
            ]
            for report in reports:  # older collectors ignore both
                if report["budget"] in wants:  # only when one was refused
                    report["want"] = wants[report["budget"]]
                if report["budget"] in caps:
                    report["cap"] = caps[report["budget"]]
            ask: dict[str, Any] = {"holder": self.holder, "reports": reports}
            if rates:
                ask["limits"] = [
                    {"limit": name, "window": minute, "used": used, "busy": busy, "want": want}
                    for name, minute, used, busy, want in rates
                ]
            got = self._http("POST", "/api/budgets/grants", ask)
            grants = {name: (float(w), int(g)) for name, (w, g) in got["grants"].items()}
            rate_grants = {
                name: [(float(w), int(g)) for w, g in pairs]
                for name, pairs in got.get("limit_grants", {}).items()
            }
        return budgets, {}, limits, {}, grants, rate_grants, recorded

    def _collector_limits(self) -> tuple[RateLimit, ...]:
        """The collector's rate limits; none from a collector too old to
        serve C{/api/limits} (a 404: its budgets still apply)."""
        try:
            rows = self._http("GET", "/api/limits")["limits"]
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            if not self._no_limits_route:
                self._no_limits_route = True
                _log.warn(
                    "budgets: collector {url} has no /api/limits (older than this proxy):"
                    " no rate limit applies",
                    url=self._collector,
                )
            return ()
        fields = set(RateLimit.__dataclass_fields__)
        return tuple(RateLimit.from_dict({k: v for k, v in r.items() if k in fields}) for r in rows)

    def _http(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self._collector}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._collector_key:
            request.add_header("Authorization", f"Bearer {self._collector_key}")
        with urllib.request.urlopen(request, timeout=self._timeout, context=self._tls) as response:
            return json.loads(response.read())

    def _apply(self, result: _Read) -> None:
        budgets, spends, limits, used, grants, rate_grants, recorded = result
        # room that scopes no longer calling set aside goes back to the
        # budgets at least once a second (see _budgets._Allotment)
        self.ledger.return_allotments()
        if budgets != self._known:
            self.ledger.load(budgets, spends)
            self._known = budgets
        if limits != self._known_limits:
            self.ledger.load_limits(limits, used)
            self._known_limits = limits
        if grants:
            self.ledger.set_grants(grants)
        if recorded:
            self.ledger.set_recorded(recorded)
        if rate_grants:
            self.ledger.set_rate_grants(rate_grants)

    def _poll(self) -> Any:
        if self._busy:
            return None
        self._busy = True
        # these calls' wants are in this snapshot: this exchange answers them
        waiters, self._waiters = self._waiters, []
        self._inflight, self._asks_sent = waiters, self.ledger.asks
        snapshot, rates, wants, caps = self._snapshots() if self.ledger.shared else ({}, [], {}, {})
        d = deferToThreadPool(
            self._reactor,  # type: ignore[arg-type]  # deferToThreadPool wants IReactorFromThreads
            self._pool,
            self._read,
            snapshot,
            rates,
            wants,
            caps,
        )
        d.addCallback(self._applied)
        d.addErrback(self._read_failed)

        def done(result: object) -> None:
            self._busy = False
            _fire(waiters)
            if self._waiters:  # asked for while this exchange was under way
                self.kick()

        d.addBoth(done)
        return d

    def next_grants(self) -> Deferred[None]:
        """A Deferred that fires once a grant exchange started from now on
        has ended (the ledger holds what it granted), or failed, or taken
        longer than the read's timeout and a second more; the exchange is
        asked for at once. A call refused only by this process's share of a
        shared budget waits for it before it is refused (see the relay)."""
        if not self.running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        waiter.addTimeout(self._timeout + 1.0, self._reactor)
        if self._busy and self.ledger.asks <= self._asks_sent:
            # the refusal that led here started the exchange under way (the
            # ledger asks at once): that exchange carries its want
            self._inflight.append(waiter)
        else:
            self._waiters.append(waiter)
            self.kick()
        return waiter

    def _applied(self, result: _Read) -> None:
        if self._collector is not None and self._outages:
            moved = self._collector != self._read_from
            _log.info(
                "budgets: {how} collector {url} after {n} failed reads",
                how="now reading from" if moved else "reading again from",
                url=self._collector,
                n=self._outages,
            )
        self._read_from = self._collector
        self._outages = 0
        self.ledger.outage = False
        self._apply(result)

    def _read_failed(self, failure: Any) -> None:
        if self._collector is not None and failure.check(OSError, ValueError):
            # an outage: this process spends what it was granted, then refuses
            # (or, for budgets with fail=open, lets calls through flagged)
            self._outages += 1
            self.ledger.outage = True
            if self._outages in (1, 10) or self._outages % 300 == 0:
                error = failure.value
                refused = isinstance(error, urllib.error.HTTPError) and error.code in (401, 403)
                _log.warn(
                    "budgets: collector {url} {what} ({n} reads): spending only what was granted",
                    url=self._collector,
                    # a key it refuses is not a network outage: say which
                    what=f"refuses this proxy's key (HTTP {error.code}, see --collector-key)"
                    if refused
                    else "unreachable",
                    n=self._outages,
                )
            self._next_collector()
            return
        # the store file: opened again on the next read; logged a few times,
        # not once a second
        self._book = None
        self._outages += 1
        if self._outages in (1, 10) or self._outages % 300 == 0:
            _log.failure(
                "reading budgets failed ({n} reads); no new budget applies until it works",
                failure,
                n=self._outages,
            )

    def _next_collector(self) -> None:
        """Read from the next --collector (round robin), as the link fails over:
        collectors on one PostgreSQL database keep the same budgets and grants."""
        urls = self._collectors
        if len(urls) > 1 and self._collector in urls:
            self._collector = urls[(urls.index(self._collector) + 1) % len(urls)]

    def kick(self) -> None:
        """Read (and exchange grants) now, unless a read is under way."""
        if self.running and not self._busy:
            self._poll()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._pool.start()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def _release_at_collector(self) -> None:
        """Give back what this process did not spend of its grants (else the
        collector keeps them counted until their windows end: it cannot
        tell a stopped proxy from one that died holding unreported spend).
        Once, with a short timeout: a collector that cannot be reached
        keeps them."""
        ledger = self.ledger
        reports = [
            {"budget": name, "window": window, "spent": spent, "busy": busy}
            for name, (window, spent, busy) in ledger.grant_snapshot().items()
        ]
        limits = [
            {"limit": name, "window": minute, "used": used, "busy": busy}
            for name, minute, used, busy, _ in ledger.rate_grant_snapshot(ledger.now())
        ]
        if not reports and not limits:
            return
        ask = {"holder": self.holder, "reports": reports, "limits": limits, "release": True}
        try:
            self._http("POST", "/api/budgets/grants", ask)
        except Exception as e:
            _log.warn(
                "budgets: could not give back this process's grants to {url} ({error});"
                " they stay counted until their windows end",
                url=self._collector,
                error=e,
            )

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        waiters, self._waiters = self._waiters, []
        _fire(waiters)  # no exchange comes now: they are refused as they stand
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._pool.stop()
        if self._collector is not None and self.ledger.shared:
            self._release_at_collector()
        if self._grants is not None:  # give back what this process did not spend
            try:
                for name, (window, _, busy) in self.ledger.grant_snapshot().items():
                    budget = next((b for b in self._known or () if b.name == name), None)
                    if budget is not None:
                        self._grants.release(budget, window, self.holder, busy)
                rules = {r.name: r for r in self._known_limits}
                for name, minute, _, busy, _ in self.ledger.rate_grant_snapshot(self.ledger.now()):
                    if name in rules:
                        self._grants.release_rate(rules[name], minute, self.holder, busy)
            except Exception:
                _log.failure("releasing budget grants failed")
        if self._book is not None:
            self._book.close()
            self._book = None
        return None


def _fire(waiters: list[Deferred[None]]) -> None:
    """Fire the waiters that have not timed out."""
    for waiter in waiters:
        if not waiter.called:
            waiter.callback(None)
