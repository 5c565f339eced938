"""C{/api/budgets}: list, set and delete budgets over HTTP.

 - C{GET /api/budgets}: C{{"budgets": [...]}}, each budget's definition with
   C{spend_usd}, C{remaining_usd} and C{window_start} (as C{llmobserve
   budgets list --format json}).
 - C{POST /api/budgets} with a budget's JSON (C{name}, C{limit_usd},
   C{window}, C{tz}, C{action}, C{unpriced}, scope fields): create or
   replace it; C{200 {"budget": {...}}}, or 400 with the reason.
 - C{DELETE /api/budgets/NAME}: 200, or 404 when there is none.
 - C{POST /api/budgets/grants}: what proxies that send their events here
   use to share the budgets and rate limits (L{GrantBook}: each spends
   only its slices).

Each request runs in the store's reader thread, with the store's budget
book (C{Store.budget_book}: the C{budgets} table of the SQLite file or of
the PostgreSQL database; see C{docs/BUDGETS.md}).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmobserve.collector._budgets import (
    Budget,
    BudgetError,
    SqlBudgetBook,
    check_scope_provider,
)
from llmobserve.collector._grants import GrantBook, SpendCache
from llmobserve.collector._store import Store, StoreUnavailable
from llmobserve.collector._thread import StoreThread

__all__ = ["BudgetsResource", "applying_to", "project_of"]

_log = Logger()
#: the largest definition or grant request read
MAX_BODY = 64 * 1024


class _Scoped(Protocol):
    """A definition with a scope (a budget, a rate limit)."""

    @property
    def provider(self) -> str | None: ...


_Definition = TypeVar("_Definition", bound=_Scoped)


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def error_body(request: Request, status: int, kind: str, message: str) -> bytes:
    return _json(request, status, {"error": {"type": kind, "message": message}})


def definition_from(
    request: Request, what: str, from_dict: Callable[[dict[str, Any]], _Definition]
) -> _Definition | bytes:
    """The definition a POST's JSON object gives (a budget, a limit), or the
    error body to answer: 413 past L{MAX_BODY}, 400 when it is not a JSON
    object or C{from_dict} refuses it."""
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        return error_body(request, 413, "body_too_large", f"a {what} is a small JSON object")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise BudgetError("expected a JSON object")
        definition = from_dict(data)
        check_scope_provider(definition.provider)
        return definition
    except (ValueError, BudgetError) as e:  # JSONDecodeError is a ValueError
        return error_body(request, 400, "bad_request", f"bad {what}: {e}")


class NotFound(Exception):
    """No definition of that name (a 404)."""


class BudgetsResource(Resource):
    """C{/api/budgets} and C{/api/budgets/NAME}."""

    isLeaf = True

    def __init__(self, reader: StoreThread) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._reader = reader
        #: the budgets' spend from the events, read once a second for every
        #: proxy's exchange (a GrantBook is made per request)
        self._spends = SpendCache()

    def _run(self, request: Request, job: Any) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def in_thread(store: Store) -> Any:
            book = store.budget_book()
            try:
                return job(book)
            finally:
                book.close()

        d: Deferred[Any] = self._reader.submit(in_thread)
        d.addCallback(lambda body: None if gone else self._send(request, _json(request, 200, body)))
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    @staticmethod
    def _send(request: Request, body: bytes) -> None:
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request, gone: list[bool]) -> None:
        if gone:
            return
        if failure.check(NotFound):
            body = error_body(request, 404, "not_found", str(failure.value))
        elif failure.check(StoreUnavailable):
            # PostgreSQL away: as the other /api routes say (a proxy asks again)
            body = error_body(request, 503, "unavailable", str(failure.value))
        else:
            _log.failure("budgets request failed", failure)
            body = error_body(request, 500, "internal", "the budgets request failed; see the log")
        self._send(request, body)

    def _name(self, request: Request) -> str | None:
        if not request.postpath or request.postpath == [b""]:
            return None
        return urllib.parse.unquote(b"/".join(request.postpath).decode("utf-8", "replace"))

    def render_GET(self, request: Request) -> bytes | int:
        if self._name(request) is not None:
            return error_body(request, 404, "not_found", "GET /api/budgets lists them all")
        project = project_of(request)
        return self._run(
            request,
            lambda book: {"budgets": applying_to(book.status(time.time()), project)},
        )

    def render_POST(self, request: Request) -> bytes | int:
        name = self._name(request)
        if name == "grants":
            return self._grants(request)
        if name is not None:
            return error_body(request, 404, "not_found", "POST a budget to /api/budgets")
        budget = definition_from(request, "budget", Budget.from_dict)
        if isinstance(budget, bytes):
            return budget

        def job(book: SqlBudgetBook) -> Any:
            book.set(budget)
            return {"budget": budget.as_dict()}

        return self._run(request, job)

    def _grants(self, request: Request) -> bytes | int:
        """C{POST /api/budgets/grants}: a proxy reports its spend per shared
        budget and takes its slices (L{GrantBook}); C{{"grants": {name:
        [window_start, granted]}}} in nano-USD (a report's C{want}, when
        given: the most a call it refused for want of grant could cost, to
        be granted even when over a slice; its C{cap}, when given: what it may
        spend until it has applied this answer, kept as its grant meanwhile).
        Its C{limits} reports (calls
        or tokens used per rate limit and minute, the current one or the
        next) take slices of those minutes: C{{"limit_grants": {name:
        [[minute, granted], ...]}}}. With C{"release": true}, a stopping
        proxy gives back what it was granted beyond each report's C{busy}
        (C{{"grants": {}, "released": true}})."""
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        try:
            doc = json.loads(raw)
            holder = doc["holder"]
            reports = [
                (
                    str(r["budget"]),
                    float(r["window"]),
                    int(r["spent"]),
                    int(r["busy"]),
                    int(r.get("want", 0)),
                    None if r.get("cap") is None else int(r["cap"]),
                )
                for r in doc["reports"]
            ]
            rate_reports = [
                (
                    str(r["limit"]),
                    float(r["window"]),
                    int(r["used"]),
                    int(r["busy"]),
                    int(r.get("want", 0)),
                )
                for r in doc.get("limits", ())
            ]
            if not isinstance(holder, str) or not 0 < len(holder) <= 64:
                raise ValueError("holder must be a short string")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return error_body(request, 400, "bad_request", f"bad grant request: {e}")

        release = doc.get("release") is True

        def job(book: SqlBudgetBook) -> Any:
            now = time.time()
            grants = GrantBook(book.connection, spends=self._spends)
            if release:  # a proxy stopping: it gives back what it did not spend
                _release(book, grants, holder, reports, rate_reports)
                return {"grants": {}, "released": True}
            out: dict[str, Any] = {
                "grants": self._budget_grants(book, grants, holder, reports, now)
            }
            if rate_reports:
                out["limit_grants"] = _rate_grants(book, grants, holder, rate_reports, now)
            return out

        return self._run(request, job)

    @staticmethod
    def _budget_grants(
        book: SqlBudgetBook,
        grants: GrantBook,
        holder: str,
        reports: list[tuple[str, float, int, int, int, int | None]],
        now: float,
    ) -> dict[str, Any]:
        budgets = {b.name: b for b in book.list()}
        out = {}
        for name, window, spent, busy, want, cap in reports:
            budget = budgets.get(name)
            if budget is None or budget.action != "block":
                continue
            if window != budget.window_start(now):
                continue  # a window that is over (or not begun): nothing to grant
            got = grants.exchange(
                budget,
                window,
                holder,
                spent=spent,
                busy=busy,
                now=now,
                recorded=partial(book.spend, budget, now),
                want=want,
                cap=cap,
            )
            out[name] = [window, got]
        return out

    def render_DELETE(self, request: Request) -> bytes | int:
        name = self._name(request)
        if name is None:
            return error_body(request, 400, "bad_request", "DELETE /api/budgets/NAME")

        def job(book: SqlBudgetBook) -> Any:
            if not book.delete(name):
                raise NotFound(f"no budget named {name!r}")
            return {"deleted": name}

        return self._run(request, job)


def _rate_grants(
    book: SqlBudgetBook,
    grants: GrantBook,
    holder: str,
    reports: list[tuple[str, float, int, int, int]],
    now: float,
) -> dict[str, list[list[float | int]]]:
    """Each reported limit's slice of the current minute or the next one
    (a proxy takes the next minute's before it begins, so that it holds a
    slice at its first call); any other minute gets nothing."""
    limits = {r.name: r for r in book.limits.list()}
    out: dict[str, list[list[float | int]]] = {}
    for name, minute, used, busy, want in reports:
        limit = limits.get(name)
        if limit is None:
            continue
        current = limit.window_start(now)
        if minute not in (current, current + 60.0):
            continue
        got = grants.exchange_rate(
            limit,
            minute,
            holder,
            used=used,
            busy=busy,
            now=now,
            recorded=partial(book.used, limit, minute),
            want=want,
        )
        out.setdefault(name, []).append([minute, got])
    return out


def _release(
    book: SqlBudgetBook,
    grants: GrantBook,
    holder: str,
    reports: list[tuple[str, float, int, int, int, int | None]],
    rate_reports: list[tuple[str, float, int, int, int]],
) -> None:
    """A stopping proxy's grants shrink to what it spent and has in flight
    (else they stay counted until their window ends: see L{GrantBook})."""
    budgets = {b.name: b for b in book.list()}
    for name, window, _, busy, _, _ in reports:
        if name in budgets:
            grants.release(budgets[name], window, holder, busy)
    limits = {r.name: r for r in book.limits.list()}
    for name, minute, _, busy, _ in rate_reports:
        if name in limits:
            grants.release_rate(limits[name], minute, holder, busy)


def project_of(request: Request) -> str | None:
    """The C{project} parameter: a project key's own (the key guard puts it
    there), or what an admin asked for (the last, as the events routes
    read it); None: every project."""
    values = (request.args or {}).get(b"project")
    return values[-1].decode("utf-8", "replace") if values else None


def applying_to(rows: list[dict[str, Any]], project: str | None) -> list[dict[str, Any]]:
    """The definitions that can apply to C{project}'s calls: those of no
    project and those of that one (all of them for None). A project's key
    does not see another project's budgets or limits, nor their spend."""
    if project is None:
        return rows
    return [row for row in rows if row.get("project") in (None, project)]
