"""C{/api/limits}: list, set and delete rate limits over HTTP.

 - C{GET /api/limits}: C{{"limits": [...]}}, each limit's definition with
   C{used} (calls or tokens the store recorded in the current UTC minute)
   and C{window_start} (that minute).
 - C{POST} or C{PUT /api/limits} with a limit's JSON (C{name},
   C{per_minute}, C{unit}, C{fail}, scope fields): create or replace it;
   C{200 {"limit": {...}}}, or 400 with the reason.
 - C{DELETE /api/limits/NAME}: 200, or 404 when there is none.

Proxies take their slices of a limit's minute with the budgets' grants
(C{POST /api/budgets/grants}, its C{limits} reports). Keys as for
C{/api/budgets}: changes need C{admin}, reading takes a read key or a
proxy's link key.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.web.server import Request

from llmobserve.collector._budgetapi import (
    BudgetsResource,
    NotFound,
    applying_to,
    definition_from,
    error_body,
    project_of,
)
from llmobserve.collector._budgets import SqlBudgetBook
from llmobserve.collector._limits import RateLimit

__all__ = ["LimitsResource"]


def limit_status(book: SqlBudgetBook, now: float) -> list[dict[str, Any]]:
    """Each limit's definition with its use in the current minute."""
    return [
        {**limit.as_dict(), "used": book.used(limit, now), "window_start": limit.window_start(now)}
        for limit in book.limits.list()
    ]


class LimitsResource(BudgetsResource):
    """C{/api/limits} and C{/api/limits/NAME} (the budgets' plumbing: each
    request runs in the store's reader thread with its budget book)."""

    def render_GET(self, request: Request) -> bytes | int:
        if self._name(request) is not None:
            return error_body(request, 404, "not_found", "GET /api/limits lists them all")
        project = project_of(request)
        return self._run(
            request,
            lambda book: {"limits": applying_to(limit_status(book, time.time()), project)},
        )

    def render_POST(self, request: Request) -> bytes | int:
        if self._name(request) is not None:
            return error_body(request, 404, "not_found", "POST a limit to /api/limits")
        limit = definition_from(request, "limit", RateLimit.from_dict)
        if isinstance(limit, bytes):
            return limit

        def job(book: SqlBudgetBook) -> Any:
            book.limits.set(limit)
            return {"limit": limit.as_dict()}

        return self._run(request, job)

    render_PUT = render_POST

    def render_DELETE(self, request: Request) -> bytes | int:
        name = self._name(request)
        if name is None:
            return error_body(request, 400, "bad_request", "DELETE /api/limits/NAME")

        def job(book: SqlBudgetBook) -> Any:
            if not book.limits.delete(name):
                raise NotFound(f"no limit named {name!r}")
            return {"deleted": name}

        return self._run(request, job)
