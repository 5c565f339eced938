"""The collector's HTTP API: C{/health}, C{/api/events}, C{/api/report}, and
C{/dashboard}, the same report as a page for people.

Plain C{twisted.web} resources. Queries run in the collector's reader
thread (its own SQLite connection), never on the reactor thread and never in
the writer thread, so a slow report delays neither ingestion nor C{/health}.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmobserve import __version__

from ._link import LinkRegistry
from ._store import FILTERS, GROUPS, Store, StoreError, StoreUnavailable
from ._thread import StoreThread
from ._timespec import TimeSpecError, parse_time
from ._writer import BatchWriter

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "SERVICE_NAME", "api_branch", "collector_root"]

SERVICE_NAME = "llmobserve-collector"
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000

_log = Logger()


class _BadRequest(Exception):
    pass


def _write_json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _error(request: Request, status: int, kind: str, message: str) -> bytes:
    return _write_json(request, status, {"error": {"type": kind, "message": message}})


def _send(request: Request, body: bytes) -> None:
    request.write(body)
    request.finish()


def _arg(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    try:
        value: str = values[-1].decode("utf-8")
        return value
    except UnicodeDecodeError:
        raise _BadRequest(f"parameter {name!r} is not UTF-8") from None


def _time_arg(request: Request, name: str) -> float | None:
    text = _arg(request, name)
    if text is None or text == "":
        return None
    try:
        return parse_time(text)
    except TimeSpecError as e:
        raise _BadRequest(str(e)) from None


def _int_arg(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    text = _arg(request, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise _BadRequest(f"parameter {name!r} must be an integer") from None
    if not lo <= value <= hi:
        raise _BadRequest(f"parameter {name!r} must be between {lo} and {hi}")
    return value


def _filters(request: Request) -> dict[str, str | None]:
    return {name: _arg(request, name) for name in FILTERS}


class _QueryResource(Resource):
    """A GET whose answer is computed by the reader thread."""

    isLeaf = True

    def __init__(self, reader: StoreThread) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._reader = reader

    def query(self, request: Request) -> Callable[[Store], Any]:
        raise NotImplementedError

    def render_GET(self, request: Request) -> bytes | int:
        try:
            job = self.query(request)
        except _BadRequest as e:
            return _error(request, 400, "bad_request", str(e))
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d: Deferred[Any] = self._reader.submit(job)
        d.addCallback(self._answer, request, gone)
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _answer(self, result: Any, request: Request, gone: list[bool]) -> None:
        if gone:
            return
        _send(request, _write_json(request, 200, result))

    def _failed(self, failure: Failure, request: Request, gone: list[bool]) -> None:
        if gone:
            return
        if failure.check(StoreUnavailable):
            body = _error(request, 503, "unavailable", str(failure.value))
        elif failure.check(StoreError):
            body = _error(request, 400, "bad_request", str(failure.value))
        else:
            _log.failure("query {uri} failed", failure, uri=request.uri)
            body = _error(request, 500, "internal", "the query failed; see the collector log")
        _send(request, body)


class EventsResource(_QueryResource):
    """C{GET /api/events}: stored events, oldest first, filtered and paged.

    Parameters: the filters of L{FILTERS} (provider, model, endpoint,
    customer, tenant, section, section_path, run, outcome, kind, host),
    C{since}, C{until}, C{limit} (default 100, at most 10,000), C{offset}.
    Answer: C{{"events": [...], "count": n, "limit": l, "offset": o}}.
    """

    def query(self, request: Request) -> Callable[[Store], Any]:
        filters = _filters(request)
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")
        limit = _int_arg(request, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
        offset = _int_arg(request, "offset", 0, 0, 2**62)

        def job(store: Store) -> dict[str, Any]:
            events = store.events(since=since, until=until, limit=limit, offset=offset, **filters)
            return {"events": events, "count": len(events), "limit": limit, "offset": offset}

        return job


class ReportResource(_QueryResource):
    """C{GET /api/report}: cost, tokens and calls grouped by C{by}.

    Parameters: C{by} (comma list or repeated; default C{provider,model};
    names of L{GROUPS}), C{since}, C{until}, and the same filters as
    C{/api/events}. Answer: C{{"by": [...], "since": s, "until": u,
    "rows": [...]}}.
    """

    def query(self, request: Request) -> Callable[[Store], Any]:
        raw = [v.decode("utf-8", "replace") for v in (request.args or {}).get(b"by", [])]
        by = [b.strip() for v in raw for b in v.split(",") if b.strip()]
        if not raw:
            by = ["provider", "model"]
        for name in by:
            if name not in GROUPS:
                raise _BadRequest(f"unknown grouping {name!r}; known: {', '.join(GROUPS)}")
        filters = _filters(request)
        filters.pop("kind", None)
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")

        def job(store: Store) -> dict[str, Any]:
            rows = store.report(by, since=since, until=until, **filters)
            return {"by": by, "since": since, "until": until, "rows": rows}

        return job


class DashboardResource(_QueryResource):
    """C{GET /dashboard}: where the money went, as a plain HTML page.

    Cost, calls and tokens by provider and model, by customer, and by
    section over a window (C{since}, default the last 24 hours; C{until}),
    then the latest calls. Server-rendered, no script, refreshed every 30 s;
    every value is HTML-escaped (labels come from applications).
    """

    _VIEWS = (
        ("By provider and model", ["provider", "model"]),
        ("By customer", ["customer"]),
        ("By section", ["section"]),
    )

    def query(self, request: Request) -> Callable[[Store], Any]:
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")
        if since is None:
            since = time.time() - 86_400

        def job(store: Store) -> str:
            total = store.report([], since=since, until=until)
            views = [
                (title, by, store.report(by, since=since, until=until)) for title, by in self._VIEWS
            ]
            calls = total[0]["calls"] if total else 0
            latest = store.events(
                kind="call", since=since, until=until, limit=20, offset=max(0, calls - 20)
            )
            return _dashboard_page(since, until, total, views, latest[::-1])

        return job

    def _answer(self, result: Any, request: Request, gone: list[bool]) -> None:
        if gone:
            return
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        _send(request, result.encode())


def _cell(value: Any) -> str:
    if value is None:
        return "<td class=none>-</td>"
    if isinstance(value, float):
        return f"<td class=num>{value:.6f}</td>"
    if isinstance(value, int):
        return f"<td class=num>{value:,}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(headings: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or '<tr><td>no calls</td></tr>'}</table>"


def _when(ts: Any) -> str:
    if ts is None:
        return "now"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    except (TypeError, ValueError, OverflowError, OSError):
        # a stored event's ts comes from a proxy: show what it said
        return str(ts)


def _dashboard_page(
    since: float,
    until: float | None,
    total: list[dict[str, Any]],
    views: list[tuple[str, list[str], list[dict[str, Any]]]],
    latest: list[dict[str, Any]],
) -> str:
    t = total[0] if total else {}
    money = ["calls", "cost_usd", "unpriced_calls", "input_tokens", "output_tokens"]
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="30">',
        "<title>llmobserve: where the money goes</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "th{background:#eee}.num{text-align:right;font-variant-numeric:tabular-nums}"
        ".none{color:#999;text-align:center}",
        "</style></head><body>",
        f"<h1>llmobserve</h1><p>{html.escape(_when(since))} to {html.escape(_when(until))}: "
        f"<b>{t.get('calls', 0):,}</b> calls, <b>{html.escape(_usd(t.get('cost_usd')))}</b>"
        f" ({t.get('unpriced_calls', 0):,} without a known price).</p>",
    ]
    for title, by, rows in views:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(_table(by + money, [[r.get(k) for k in by + money] for r in rows[:50]]))
    parts.append("<h2>Latest calls</h2>")
    cols = ["ts", "provider", "model", "endpoint", "status", "outcome", "cost_usd"]
    recent = [[_when(e.get("ts")), *(e.get(k) for k in cols[1:])] for e in latest]
    parts.append(_table(["time", *cols[1:]], recent))
    parts.append(
        '<p>JSON: <a href="/api/report">/api/report</a>, <a href="/api/events">/api/events</a>.'
        "</p></body></html>"
    )
    return "".join(parts)


def _usd(cost: Any) -> str:
    return "no priced calls" if cost is None else f"${cost:,.6f}"


class HealthResource(Resource):
    """C{GET /health}: status, service name, version, events stored, links."""

    isLeaf = True

    def __init__(self, writer: BatchWriter, links: LinkRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._writer = writer
        self._links = links

    def render_GET(self, request: Request) -> bytes:
        w = self._writer
        return _write_json(
            request,
            200,
            {
                "status": "ok",
                "service": SERVICE_NAME,
                "version": __version__,
                "events_stored": w.stored,
                "events_queued": w.queued,
                "duplicates_ignored": w.duplicates,
                "commits": w.commits,
                "links": self._links.describe(),
                "link_protocol_errors": self._links.protocol_errors,
                "events_rejected": w.rejected,
                "partial_frame_bytes": self._links.budget.held,
                "links_refused_for_memory": self._links.budget.refusals,
                "log_lines_suppressed": (
                    0 if self._links.limiter is None else self._links.limiter.suppressed
                ),
            },
        )


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _error(request, 404, "not_found", "no such resource; see /")


class _Branch(Resource):
    """A resource with children whose unknown paths get a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted


class _Index(_Branch):
    def render_GET(self, request: Request) -> bytes:
        return _write_json(
            request,
            200,
            {
                "service": SERVICE_NAME,
                "version": __version__,
                "endpoints": ["/health", "/api/events", "/api/report", "/dashboard"],
            },
        )


def api_branch(reader: StoreThread) -> Resource:
    """C{/api}: C{events} and C{report} over the store C{reader} reads (the
    collector's, or an embedded proxy's own)."""
    api = _Branch()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    api.putChild(b"events", EventsResource(reader))
    api.putChild(b"report", ReportResource(reader))
    return api


def collector_root(reader: StoreThread, writer: BatchWriter, links: LinkRegistry) -> Resource:
    """The resource tree served on the collector's port."""
    root = _Index()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    root.putChild(b"", root)
    root.putChild(b"health", HealthResource(writer, links))
    root.putChild(b"dashboard", DashboardResource(reader))
    root.putChild(b"api", api_branch(reader))
    return root
