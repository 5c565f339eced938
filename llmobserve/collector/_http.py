"""The collector's HTTP API: C{/health}, C{/api/events} (and
C{/api/events/ID}), C{/api/report}, C{/api/summary}, C{/api/timeseries},
C{/api/runs/ID}, and C{/dashboard}, the page that reads them (C{/} redirects
there). Every route is put in L{collector_root} and L{api_branch}: a
wrapper (authentication, say) wraps what they return.

Plain C{twisted.web} resources. Queries run in the collector's reader
thread (its own SQLite connection), never on the reactor thread and never in
the writer thread, so a slow report delays neither ingestion nor C{/health}.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmobserve import __version__

from . import _insights
from ._budgetapi import BudgetsResource
from ._dashboard import DashboardResource
from ._limitapi import LimitsResource
from ._link import LinkRegistry
from ._store import FILTERS, GROUPS, Store, StoreError, StoreUnavailable, StoreUnsupported
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


class _Missing(Exception):
    """What a query looked for is not stored: a 404."""


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
        elif failure.check(StoreUnsupported):
            body = _error(request, 501, "not_implemented", str(failure.value))
        elif failure.check(StoreError):
            body = _error(request, 400, "bad_request", str(failure.value))
        elif failure.check(_Missing):
            body = _error(request, 404, "not_found", str(failure.value))
        else:
            _log.failure("query {uri} failed", failure, uri=request.uri)
            body = _error(request, 500, "internal", "the query failed; see the collector log")
        _send(request, body)


class EventsResource(_QueryResource):
    """C{GET /api/events}: stored events, oldest first, filtered and paged.

    Parameters: the filters of L{FILTERS} (provider, model, endpoint,
    customer, tenant, section, section_path, run, outcome, kind, host),
    status, usage_source), C{since}, C{until}, C{limit} (default 100, at
    most 10,000), C{offset}, C{order} (C{asc}, the default, or C{desc}:
    newest first). Answer: C{{"events": [...], "count": n, "limit": l,
    "offset": o}}.

    C{GET /api/events/ID}: the one event with that C{id} (C{{"event":
    {...}}}), or a 404.
    """

    def query(self, request: Request) -> Callable[[Store], Any]:
        event_id = _path_tail(request)
        if event_id is not None:
            return _one_event(event_id)
        filters = _filters(request)
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")
        limit = _int_arg(request, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
        offset = _int_arg(request, "offset", 0, 0, 2**62)
        order = _arg(request, "order") or "asc"
        if order not in ("asc", "desc"):
            raise _BadRequest("parameter 'order' must be asc or desc")

        def job(store: Store) -> dict[str, Any]:
            events = store.events(
                since=since,
                until=until,
                limit=limit,
                offset=offset,
                newest_first=order == "desc",
                **filters,
            )
            return {"events": events, "count": len(events), "limit": limit, "offset": offset}

        return job


def _path_tail(request: Request) -> str | None:
    """The one path segment after a leaf resource's own (an id), or None."""
    rest = [p for p in (request.postpath or []) if p]
    if not rest:
        return None
    if len(rest) > 1:
        raise _BadRequest("one id after the resource's path, not " + str(len(rest)))
    try:
        return str(rest[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadRequest("the id is not UTF-8") from None


def _one_event(event_id: str) -> Callable[[Store], Any]:
    def job(store: Store) -> dict[str, Any]:
        event = _insights.event_by_id(store, event_id)
        if event is None:
            raise _Missing(f"no event with id {event_id!r}")
        return {"event": event}

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
            rows = _insights.report(store, by, since, until, filters)
            return {"by": by, "since": since, "until": until, "rows": rows}

        return job


class SummaryResource(_QueryResource):
    """C{GET /api/summary}: a window's totals for the dashboard's overview.

    Parameters: C{since}, C{until} (default: all time) and the filters of
    C{/api/events} but C{kind}. Answer: calls, C{cost_usd}, input and output
    tokens, errors and C{error_rate}, C{unpriced_calls}, C{unpriced_share}
    and the commonest C{unpriced_reasons}, C{latency_ms} C{p50} and C{p95}.
    """

    def query(self, request: Request) -> Callable[[Store], Any]:
        filters = _filters(request)
        filters.pop("kind", None)
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")
        return lambda store: _insights.summary(store, since, until, filters)


_BUCKET = re.compile(r"([0-9]{1,9})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _bucket_arg(request: Request, span: float) -> int:
    text = _arg(request, "bucket") or "auto"
    if text == "auto":
        return _insights.auto_bucket(span)
    match = _BUCKET.fullmatch(text)
    if match is None:
        raise _BadRequest("parameter 'bucket' must be auto or a size like 5m, 1h, 1d")
    size = int(match[1]) * _UNIT[match[2]]
    if size < 1:
        raise _BadRequest("parameter 'bucket' must be at least 1s")
    if span / size > _insights.MAX_BUCKETS:
        raise _BadRequest(
            f"bucket {text} makes more than {_insights.MAX_BUCKETS} buckets; pick a larger one"
        )
    return size


class TimeseriesResource(_QueryResource):
    """C{GET /api/timeseries}: cost and calls per time bucket, one series for
    each provider or model.

    Parameters: C{by} (C{provider}, the default, or C{model}), C{bucket}
    (C{auto}, the default: 24 to 96 buckets; or a size such as C{5m},
    C{1h}, C{1d}), C{since} (default 24 hours ago), C{until} (default now),
    and the filters of C{/api/events} but C{kind}. Answer: C{starts} (each
    bucket's start) and C{series}, each a C{name} with C{cost_usd} and
    C{calls} per bucket; the costliest 8 series, the rest as C{other}.
    """

    def query(self, request: Request) -> Callable[[Store], Any]:
        by = _arg(request, "by") or "provider"
        if by not in _insights.SERIES:
            raise _BadRequest(f"unknown series {by!r}; known: {', '.join(_insights.SERIES)}")
        filters = _filters(request)
        filters.pop("kind", None)
        now = time.time()
        since = _time_arg(request, "since")
        until = _time_arg(request, "until")
        until = now if until is None else until
        since = until - 86_400 if since is None else since
        if not since < until:
            raise _BadRequest("'since' must be before 'until'")
        span = until - since
        if not math.isfinite(span):
            raise _BadRequest("the window is too long")
        bucket = _bucket_arg(request, span)
        return lambda store: _insights.timeseries(store, by, bucket, since, until, filters)


class RunsResource(_QueryResource):
    """C{GET /api/runs/RUN_ID}: one run's events (calls and spans) oldest
    first, with its calls' total cost and its start and end; a 404 for a run
    with no stored event."""

    def query(self, request: Request) -> Callable[[Store], Any]:
        run_id = _path_tail(request)
        if run_id is None:
            raise _BadRequest("name a run: /api/runs/RUN_ID (GET /api/report?by=run lists them)")

        def job(store: Store) -> dict[str, Any]:
            found = _insights.run(store, run_id)
            if not found["events"]:
                raise _Missing(f"no event of run {run_id!r}")
            return found

        return job


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


_ENDPOINTS = [
    "/health",
    "/api/events",
    "/api/events/ID",
    "/api/report",
    "/api/summary",
    "/api/timeseries",
    "/api/runs/ID",
    "/dashboard",
]


class _Index(_Branch):
    """C{GET /api}: the service, its version and its endpoints."""

    def render_GET(self, request: Request) -> bytes:
        return _write_json(
            request,
            200,
            {"service": SERVICE_NAME, "version": __version__, "endpoints": _ENDPOINTS},
        )


class _ToDashboard(_Branch):
    """C{GET /}: a redirect to the dashboard."""

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", b"/dashboard")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"see /dashboard\n"


def start_warm_up(reader: StoreThread) -> None:
    """Sum the store into the dashboard's rollup in the reader thread, one
    short step at a time (L{_insights.warm_up}), so that the first long
    window asked for is answered from it; queries run between the steps."""

    def step(caught_up: bool) -> None:
        if not caught_up:
            reader.submit(_insights.warm_up).addCallbacks(step, _warm_up_failed)

    step(False)


def _warm_up_failed(failure: Failure) -> None:
    # the queries still answer (from the events, or with the store's error)
    _log.warn("dashboard sums not built: {why}", why=failure.getErrorMessage())


def api_branch(reader: StoreThread) -> Resource:
    """C{/api}: C{events}, C{report}, C{summary}, C{timeseries} and C{runs}
    over the store C{reader} reads (the collector's, or an embedded proxy's
    own); C{/api} itself lists the endpoints."""
    start_warm_up(reader)
    api = _Index()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    api.putChild(b"", api)
    api.putChild(b"events", EventsResource(reader))
    api.putChild(b"report", ReportResource(reader))
    api.putChild(b"summary", SummaryResource(reader))
    api.putChild(b"timeseries", TimeseriesResource(reader))
    api.putChild(b"runs", RunsResource(reader))
    api.putChild(b"budgets", BudgetsResource(reader))
    api.putChild(b"limits", LimitsResource(reader))
    return api


def collector_root(reader: StoreThread, writer: BatchWriter, links: LinkRegistry) -> Resource:
    """The resource tree served on the collector's port: every route, in one place."""
    root = _ToDashboard()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    root.putChild(b"", root)
    root.putChild(b"health", HealthResource(writer, links))
    root.putChild(b"dashboard", DashboardResource())
    root.putChild(b"api", api_branch(reader))
    return root
