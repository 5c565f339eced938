"""The collector's HTTP API in memory (treq's StubTreq over the resource tree)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed

from llmobserve import __version__
from llmobserve.collector._http import collector_root
from llmobserve.collector._link import LinkRegistry
from llmobserve.collector._store import EventStore
from llmobserve.collector._writer import BatchWriter

T0 = 1_750_000_000.0


class SyncRunner:
    """Runs store jobs at once (a store thread stand-in)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def submit(self, job: Callable[[EventStore], Any]) -> Deferred[Any]:
        try:
            return succeed(job(self.store))
        except Exception as e:
            return fail(e)


class Client:
    def __init__(self, tmp_path: Path, store: Any = None) -> None:
        self.store = EventStore(tmp_path / "x.sqlite3") if store is None else store
        runner = SyncRunner(self.store)
        self.writer = BatchWriter(runner)
        self.links = LinkRegistry()
        root = collector_root(runner, self.writer, self.links)  # type: ignore[arg-type]  # SyncRunner
        self.treq: Any = StubTreq(root)  # type: ignore[no-untyped-call]  # treq is untyped

    def get(self, path: str) -> tuple[int, Any, Any]:
        results: list[Any] = []
        d = self.treq.get("http://127.0.0.1:8000" + path)
        d.addCallback(
            lambda r: self.treq.json_content(r).addCallback(lambda body: results.append((r, body)))
        )
        d.addErrback(results.append)
        self.treq.flush()
        assert len(results) == 1, results
        response, body = results[0]
        return response.code, response.headers, body


def _filled_client(tmp_path: Path, store: Any) -> Client:
    """A client over C{store} (None: SQLite) holding the tests' events."""
    c = Client(tmp_path, store)
    c.writer.write(
        [
            {
                "id": "a",
                "kind": "call",
                "ts": T0,
                "provider": "openai",
                "model": "gpt-4o",
                "cost_usd": 1.0,
                "usage": {"input_tokens": 10},
                "context": {"customer_id": "acme", "run_id": "r1", "section": "plan"},
            },
            {
                "id": "b",
                "kind": "call",
                "ts": T0 + 10,
                "provider": "anthropic",
                "model": "claude",
                "outcome": "upstream_error",
                "cost_usd": 3.0,
                "context": {"customer_id": "globex", "tenant_id": "t9"},
            },
            {"id": "c", "kind": "span", "ts": T0 + 20, "run_id": "r1"},
        ]
    )
    return c


@pytest.fixture(params=["sqlite", "postgres"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A collector's HTTP API over a SQLite store, and over a PostgreSQL one."""
    store = None
    if request.param == "postgres":
        from llmobserve.collector._pgstore import PgEventStore

        store = PgEventStore(request.getfixturevalue("pg_url"))
    c = _filled_client(tmp_path, store)
    yield c
    c.store.close()


def test_dashboard_queries_answer_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """Every /api/* route of the dashboard answers on PostgreSQL (they were a
    501 not_implemented): the same bodies as over a SQLite store fed the
    same events."""
    from llmobserve.collector._pgstore import PgEventStore

    paths = (
        "/api/summary?since=0",
        "/api/timeseries?since=1749900000&until=1750100000&bucket=1h",
        "/api/events/a",
        "/api/runs/r1",
        "/api/report?by=provider",
    )
    answers = []
    for store in (PgEventStore(pg_url), None):
        c = _filled_client(tmp_path / ("pg" if store else "sqlite"), store)
        try:
            answers.append([c.get(path)[::2] for path in paths])
        finally:
            c.store.close()
    for path, pg, sqlite in zip(paths, *answers, strict=True):
        assert pg[0] == 200, (path, pg)
        assert pg == sqlite, path


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Any:
    """L{client} on SQLite only (hypothesis under pytest-twisted runs a
    parametrized test's second variant outside its greenlet)."""
    c = _filled_client(tmp_path, None)
    yield c
    c.store.close()


def test_health(client: Client) -> None:
    """/health: status, service name, version, and the number of events stored."""
    code, headers, body = client.get("/health")
    assert code == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert body["status"] == "ok"
    assert body["service"] == "llmobserve-collector"
    assert body["version"] == __version__
    assert body["events_stored"] == 3
    assert body["links"] == []


def test_events_all_and_filters(client: Client) -> None:
    """/api/events lists events oldest first and applies every filter."""
    code, _, body = client.get("/api/events")
    assert code == 200
    assert [e["id"] for e in body["events"]] == ["a", "b", "c"]
    assert body["count"] == 3 and body["limit"] == 100 and body["offset"] == 0

    def ids(query: str) -> list[str]:
        code, _, body = client.get("/api/events?" + query)
        assert code == 200, body
        return [e["id"] for e in body["events"]]

    assert ids("provider=anthropic") == ["b"]
    assert ids("model=gpt-4o") == ["a"]
    assert ids("customer=acme") == ["a"]
    assert ids("tenant=t9") == ["b"]
    assert ids("section=plan") == ["a"]
    assert ids("run=r1") == ["a", "c"]
    assert ids("outcome=upstream_error") == ["b"]
    assert ids("kind=span") == ["c"]
    assert ids(f"since={T0 + 5}") == ["b", "c"]
    assert ids(f"until={T0 + 5}") == ["a"]
    assert ids("since=2025-06-15T15:06:45Z") == ["b", "c"]
    assert ids("limit=1&offset=1") == ["b"]
    assert ids("since=1h") == []  # T0 is long ago


def test_event_fields_in_answer(client: Client) -> None:
    """Events come back with DESIGN.md's field names and null costs intact."""
    _, _, body = client.get("/api/events?limit=1")
    (event,) = body["events"]
    assert event["id"] == "a"
    assert event["usage"] == {"input_tokens": 10}
    assert event["context"]["customer_id"] == "acme"
    assert "cost_usd" in event and "graphql" in event


@pytest.mark.parametrize(
    "query",
    ["since=yesterday-ish", "limit=-1", "limit=abc", "limit=100000", "offset=-3", "until=nan"],
)
def test_events_bad_parameters(client: Client, query: str) -> None:
    """Bad parameters give 400 with a JSON error, not a crash."""
    code, _, body = client.get("/api/events?" + query)
    assert code == 400
    assert body["error"]["type"] == "bad_request"


def test_report_default_and_by(client: Client) -> None:
    """/api/report groups calls (not spans) by provider,model or any grouping."""
    code, _, body = client.get("/api/report")
    assert code == 200
    assert body["by"] == ["provider", "model"]
    assert [(r["provider"], r["model"], r["calls"], r["cost_usd"]) for r in body["rows"]] == [
        ("anthropic", "claude", 1, 3.0),
        ("openai", "gpt-4o", 1, 1.0),
    ]
    _, _, body = client.get("/api/report?by=customer")
    assert {r["customer"]: r["cost_usd"] for r in body["rows"]} == {"acme": 1.0, "globex": 3.0}
    _, _, body = client.get("/api/report?by=provider&by=day")
    assert body["by"] == ["provider", "day"]
    assert body["rows"][0]["day"] == "2025-06-15"
    _, _, body = client.get(f"/api/report?by=provider&since={T0 + 5}")
    assert [r["provider"] for r in body["rows"]] == ["anthropic"]
    _, _, body = client.get("/api/report?by=")
    assert body["by"] == [] and body["rows"][0]["calls"] == 2


def test_report_unknown_grouping(client: Client) -> None:
    """An unknown grouping is a 400 naming the valid ones."""
    code, _, body = client.get("/api/report?by=colour")
    assert code == 400
    assert "provider" in body["error"]["message"]


def test_index_and_unknown_path(client: Client) -> None:
    """/ redirects to the dashboard; /api names the endpoints; an unknown path is a 404."""
    results: list[Any] = []
    client.treq.get("http://127.0.0.1:8000/", allow_redirects=False).addCallback(results.append)
    client.treq.flush()
    assert results[0].code == 302
    assert results[0].headers.getRawHeaders(b"location") == [b"/dashboard"]
    code, _, body = client.get("/api")
    assert code == 200 and "/api/events" in body["endpoints"]
    assert "/api/summary" in body["endpoints"] and "/dashboard" in body["endpoints"]
    results = []
    client.treq.get("http://127.0.0.1:8000/nope").addCallback(results.append)
    client.treq.flush()
    assert results[0].code == 404


def _page(client: Client, path: str) -> tuple[Any, bytes]:
    results: list[Any] = []
    d = client.treq.get("http://127.0.0.1:8000" + path)
    d.addCallback(lambda r: client.treq.content(r).addCallback(lambda t: results.append((r, t))))
    client.treq.flush()
    ((response, body),) = results
    return response, body


def test_dashboard_serves_its_own_files_with_a_strict_policy(client: Client) -> None:
    """/dashboard is the page; its script, chart and style come from the package
    (no CDN); only this origin's scripts may run; unknown files are a JSON 404;
    a bad window in the address is a 400 at once."""
    response, page = _page(client, "/dashboard?since=24h")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    policy = response.headers.getRawHeaders(b"content-security-policy")[0]
    assert b"script-src 'self'" in policy and b"default-src 'none'" in policy
    assert b"http://" not in page and b"https://" not in page
    for name, kind in [("app.js", b"text/javascript"), ("chart.js", b"text/javascript")]:
        response, body = _page(client, "/dashboard/" + name)
        assert response.code == 200 and body
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
    response, css = _page(client, "/dashboard/app.css")
    assert response.code == 200 and b"@media" in css
    assert _status(client, "/dashboard/nope.js") == 404
    assert _status(client, "/dashboard/app.js/x") == 404
    assert client.get("/dashboard?since=yesterday-ish")[0] == 400


NINES = "9" * 400


@pytest.mark.parametrize(
    "path",
    [
        f"/api/report?since={NINES}s",
        f"/api/report?until={NINES}h",
        "/api/report?since=1e308",
        "/api/report?since=-1e308",
        f"/api/events?since={NINES}w",
        "/api/events?until=1e308",
        "/dashboard?since=1e308",
        "/dashboard?since=-1e308",
        f"/dashboard?until={NINES}h",
        "/api/summary?since=1e308",
        f"/api/timeseries?since={NINES}s",
        "/api/timeseries?until=9999-12-31T23:59-01:00",
        "/api/report?since=0001-01-01T00:00%2B01:00",
        "/api/report?until=9999-12-31T23:59-01:00",
    ],
)
def test_times_outside_years_1_to_9999_are_400(client: Client, path: str) -> None:
    """Time bounds past the float range or outside the years 1..9999 are a 400
    with the error contract (they were a 500: infinities in the JSON answer,
    gmtime overflowing on the dashboard)."""
    code, headers, body = client.get(path)
    assert code == 400, body
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert body["error"]["type"] == "bad_request"
    assert "time" in body["error"]["message"]


def test_report_and_summary_survive_extreme_stored_values(client: Client) -> None:
    """Stored values come from proxies: costs summing past the float range and a
    ts no calendar holds answer 200 (the sum reads as unknown), not 500."""
    client.writer.write(
        [
            {"id": "big1", "kind": "call", "ts": 1e300, "provider": "p", "cost_usd": 1e308},
            {"id": "big2", "kind": "call", "ts": 1e300, "provider": "p", "cost_usd": 1e308},
        ]
    )
    code, _, body = client.get("/api/report?by=provider")
    assert code == 200
    assert {r["provider"]: r["cost_usd"] for r in body["rows"]}["p"] is None
    code, _, body = client.get("/api/summary?since=0")
    assert code == 200 and body["cost_usd"] is None and body["calls"] == 4
    assert _status(client, "/api/timeseries?since=0&until=2e300&bucket=auto") in (200, 400)


def _status(client: Client, path: str) -> int:
    """The status of one GET (any body)."""
    results: list[Any] = []
    d = client.treq.get("http://127.0.0.1:8000" + path)
    d.addCallback(lambda r: client.treq.content(r).addCallback(lambda _: results.append(r.code)))
    d.addErrback(results.append)
    client.treq.flush()
    assert len(results) == 1 and isinstance(results[0], int), results
    return int(results[0])


_ROUTES = [
    "/api/events",
    "/api/events/a",
    "/api/report",
    "/api/summary",
    "/api/timeseries",
    "/api/runs/r1",
    "/api",
    "/dashboard",
    "/health",
]
_PARAMS = [
    "since",
    "until",
    "limit",
    "offset",
    "by",
    "provider",
    "model",
    "endpoint",
    "customer",
    "tenant",
    "section",
    "section_path",
    "run",
    "outcome",
    "kind",
    "host",
    "status",
    "usage_source",
    "order",
    "bucket",
    "x",
]
# what people and fuzzers type into a time or number: numbers of any size
# (as integers, floats, exponents), a unit or none, dates of any year
_NUMBER = (
    st.integers(min_value=-(10**420), max_value=10**420).map(str)
    | st.floats().map(repr)
    | st.tuples(st.integers(-999, 999), st.integers(-400, 400)).map(lambda t: f"{t[0]}e{t[1]}")
)
_TIME_LIKE = st.tuples(_NUMBER, st.sampled_from(["", "s", "m", "h", "d", "w", "x", " H"])).map(
    "".join
) | st.from_regex(r"\A[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}(T[0-9:]{0,8})?([+-][0-9:]{1,6}|Z)?\Z")


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(_ROUTES),
    params=st.lists(
        st.tuples(
            st.sampled_from(_PARAMS),
            st.one_of(_TIME_LIKE, _NUMBER, st.text(max_size=40), st.binary(max_size=12)),
        ),
        max_size=4,
    ),
)
def test_random_parameters_never_give_500(
    sqlite_client: Client, route: str, params: list[tuple[str, str | bytes]]
) -> None:
    """Whatever the query string (text, bytes that are not UTF-8, numbers of any
    size, dates of any year), every route of the collector's HTTP API and the
    dashboard answers 200 or 400, never 500. The proxy's own C{/api} is the
    same resources (L{api_branch})."""
    query = "&".join(f"{quote(name)}={quote(value)}" for name, value in params)
    code = _status(sqlite_client, f"{route}?{query}")
    assert code in (200, 400), (route, query, code)


def _dashboard_calls(client: Client) -> None:
    """Four calls of the last hour of T0 + 3600 and one span, for the dashboard's endpoints."""
    client.writer.write(
        [
            {
                "id": f"d{i}",
                "kind": "call",
                "ts": T0 + 3600 + 600 * i,
                "provider": provider,
                "model": model,
                "status": status,
                "outcome": outcome,
                "duration_ms": float(duration),
                "usage_source": "reported",
                "cost_usd": cost,
                "price_ref": None if cost is not None else f"unknown model: {model}",
                "usage": {"input_tokens": 100, "output_tokens": 10},
                "context": {"run_id": "run-9", "customer_id": "acme"},
            }
            for i, (provider, model, status, outcome, duration, cost) in enumerate(
                [
                    ("openai", "gpt-4o", 200, "ok", 100, 0.25),
                    ("openai", "gpt-4o", 200, "ok", 300, 0.5),
                    ("anthropic", "mystery", 200, "ok", 200, None),
                    ("anthropic", "claude", 529, "upstream_error", 400, 0.0),
                ]
            )
        ]
        + [{"id": "s1", "kind": "span", "ts": T0 + 3600, "run_id": "run-9", "name": "plan"}]
    )


def test_unknown_cost_reasons_leave_out_calls_not_forwarded(client: Client) -> None:
    """A call the proxy refused has no price, but it is no call of any provider:
    /api/summary left it out of unpriced_calls yet listed its price_ref among
    the unknown-cost reasons ("every call priced" beside "no parser for this
    host"). Left out there too, on a short and a long window, unless an
    outcome filter asks for it."""
    _dashboard_calls(client)
    client.writer.write(
        [
            {
                "id": "refused-1",
                "kind": "call",
                "ts": T0 + 3700,
                "provider": "unknown",
                "cost_usd": None,
                "price_ref": "not priced: no parser for this host",
                "status": 403,
                "outcome": "refused",
                "usage": {},
                "usage_source": "missing",
                "duration_ms": 0.25,
            }
        ]
    )
    _, _, short = client.get(f"/api/summary?since={T0 + 3600}&until={T0 + 6000}")
    assert short["refused_calls"] == 1 and short["unpriced_calls"] == 1
    assert short["unpriced_reasons"] == [{"reason": "unknown model: mystery", "calls": 1}]
    _, _, long = client.get(f"/api/summary?since={T0 + 3000}")
    assert long["unpriced_reasons"] == short["unpriced_reasons"]
    _, _, refused = client.get(f"/api/summary?since={T0 + 3600}&outcome=refused")
    assert refused["unpriced_reasons"] == [
        {"reason": "not priced: no parser for this host", "calls": 1}
    ]


def test_summary_totals_errors_unknown_cost_and_latency(client: Client) -> None:
    """/api/summary: calls, cost, tokens, the error rate (outcome not ok or status
    >= 400), the share of calls of unknown cost with its commonest reasons, and
    nearest-rank p50/p95 of duration_ms; spans are not calls."""
    _dashboard_calls(client)
    code, _, body = client.get(f"/api/summary?since={T0 + 3600}&until={T0 + 6000}")
    assert code == 200, body
    assert body["calls"] == 4 and body["cost_usd"] == 0.75
    assert body["input_tokens"] == 400 and body["output_tokens"] == 40
    assert body["errors"] == 1 and body["error_rate"] == 0.25
    assert body["unpriced_calls"] == 1 and body["unpriced_share"] == 0.25
    assert body["unpriced_reasons"] == [{"reason": "unknown model: mystery", "calls": 1}]
    assert body["latency_ms"] == {"p50": 200.0, "p95": 400.0}
    # a long window: the same sums from the rollup, percentiles within 2.5 %
    code, _, long = client.get(f"/api/summary?since={T0 + 3000}")
    assert {k: long[k] for k in ("calls", "cost_usd", "errors", "unpriced_calls")} == {
        k: body[k] for k in ("calls", "cost_usd", "errors", "unpriced_calls")
    }
    assert long["unpriced_reasons"] == body["unpriced_reasons"]
    assert long["latency_ms"]["p50"] == pytest.approx(200.0, rel=0.025)
    assert long["latency_ms"]["p95"] == pytest.approx(400.0, rel=0.025)
    code, _, body = client.get(f"/api/summary?since={T0 + 3600}&provider=openai")
    assert body["calls"] == 2 and body["error_rate"] == 0.0
    code, _, empty = client.get("/api/summary?since=1h")
    assert code == 200 and empty["calls"] == 0 and empty["error_rate"] is None
    assert empty["latency_ms"] == {"p50": None, "p95": None}


def test_timeseries_buckets_by_provider_and_model(client: Client) -> None:
    """/api/timeseries: buckets aligned to multiples of their size, every one
    from since to until listed (zeros where nothing happened), one series per
    provider or model, costliest first."""
    _dashboard_calls(client)
    since, until = T0 + 3600, T0 + 3600 + 2400
    code, _, body = client.get(f"/api/timeseries?since={since}&until={until}&bucket=10m")
    assert code == 200, body
    origin = since // 600 * 600  # the calls sit 400 s into their buckets
    assert body["bucket"] == 600 and body["starts"] == [origin + 600 * i for i in range(5)]
    series = {s["name"]: s for s in body["series"]}
    assert [s["name"] for s in body["series"]] == ["openai", "anthropic"]
    assert series["openai"]["cost_usd"] == [0.25, 0.5, 0.0, 0.0, 0.0]
    assert series["anthropic"]["calls"] == [0, 0, 1, 1, 0]
    code, _, body = client.get(f"/api/timeseries?since={since}&until={until}&by=model")
    assert code == 200 and body["bucket"] == 60 and len(body["starts"]) == 41
    assert {s["name"] for s in body["series"]} == {"gpt-4o", "mystery", "claude"}
    assert sum(sum(s["calls"]) for s in body["series"]) == 4


@pytest.mark.parametrize(
    "query",
    [
        "by=colour",
        "bucket=fortnight",
        "bucket=0s",
        "bucket=1s&since=30d",
        "since=1h&until=2h",
        "kind=span&since=1h&provider=",
    ],
)
def test_timeseries_bad_parameters_are_400(client: Client, query: str) -> None:
    """An unknown series, a bucket that is no size, too many buckets, or a
    window that ends before it starts is a 400 with the error contract."""
    code, _, body = client.get("/api/timeseries?" + query)
    if query.startswith("kind="):
        assert code == 200  # kind is not a filter of a series of calls: ignored
        return
    assert code == 400, body
    assert body["error"]["type"] == "bad_request"


def test_one_event_and_one_run(client: Client) -> None:
    """/api/events/ID is that event (a JSON 404 when none); /api/runs/ID lists a
    run's calls and spans oldest first (ties in arrival order) with its calls' total cost."""
    _dashboard_calls(client)
    code, _, body = client.get("/api/events/d1")
    assert code == 200 and body["event"]["id"] == "d1" and body["event"]["cost_usd"] == 0.5
    code, _, body = client.get("/api/events/nope")
    assert code == 404 and body["error"]["type"] == "not_found"
    assert client.get("/api/events/a/b")[0] == 400
    code, _, body = client.get("/api/runs/run-9")
    assert code == 200, body
    assert [e["id"] for e in body["events"]] == ["d0", "s1", "d1", "d2", "d3"]
    assert body["calls"] == 4 and body["cost_usd"] == 0.75 and body["unpriced_calls"] == 1
    assert body["start"] == T0 + 3600 and body["end"] == T0 + 3600 + 1800 + 0.4
    assert client.get("/api/runs/none-such")[0] == 404
    assert client.get("/api/runs")[0] == 400


def test_events_newest_first_and_the_calls_page_filters(client: Client) -> None:
    """/api/events takes order=desc (the calls page, newest first) and filters on
    status and usage_source as on the other columns; order is asc or desc."""
    _dashboard_calls(client)

    def ids(query: str) -> list[str]:
        code, _, body = client.get("/api/events?kind=call&" + query)
        assert code == 200, body
        return [e["id"] for e in body["events"]]

    assert ids(f"since={T0 + 3600}&order=desc") == ["d3", "d2", "d1", "d0"]
    assert ids(f"since={T0 + 3600}&order=desc&limit=2&offset=1") == ["d2", "d1"]
    assert ids("status=529") == ["d3"]
    assert ids("usage_source=reported&provider=openai") == ["d0", "d1"]
    assert client.get("/api/events?order=sideways")[0] == 400


def test_long_windows_read_the_rollup_and_match_the_events(client: Client) -> None:
    """Unfiltered long windows are summed from hourly and daily sums plus their
    ragged edges: the report, summary and series equal what the events say,
    and an event stored late, into an hour already summed, is counted."""
    client.writer.write(
        [
            {
                "id": f"r{i}",
                "kind": "call",
                "ts": T0 + i * 3 * 3600 + 17.5,
                "provider": ["openai", "anthropic", "google"][i % 3],
                "model": f"m{i % 4}",
                "cost_usd": None if i % 7 == 0 or i % 13 == 5 else 0.001 * (i + 1),
                "status": 403 if i % 13 == 5 else 500 if i % 11 == 0 else 200,
                "duration_ms": 100.0 + i,
                # (a refusal went nowhere: no usage, no cost)
                "usage": {} if i % 13 == 5 else {"input_tokens": i, "output_tokens": 2 * i},
                "usage_source": (
                    "missing" if i % 13 == 5 else "estimated" if i % 6 == 1 else "reported"
                ),
                # the proxy's own refusals: not in a report's calls
                "outcome": "refused" if i % 13 == 5 else "ok",
                "context": {"customer_id": f"c{i % 5}", "section_path": f"a{i % 2}/t{i % 3}"},
            }
            for i in range(40)  # five days
        ]
    )
    since, until = T0 + 1800, T0 + 4.5 * 86_400

    def same_report(by: str) -> None:
        code, _, body = client.get(f"/api/report?by={by}&since={since}&until={until}")
        assert code == 200, body
        expected = client.store.report([by], since=since, until=until)
        assert [r[by] for r in body["rows"]] == [r[by] for r in expected]
        for got, want in zip(body["rows"], expected, strict=True):
            assert got == {**want, "cost_usd": pytest.approx(want["cost_usd"])}

    for by in ("customer", "section_path", "provider", "model", "endpoint", "tenant"):
        same_report(by)
    (total,) = client.store.report([], since=since, until=until)
    _code, _, body = client.get(f"/api/summary?since={since}&until={until}")
    assert body["calls"] == total["calls"] and body["unpriced_calls"] == total["unpriced_calls"]
    assert body["cost_usd"] == pytest.approx(total["cost_usd"])
    assert body["refused_calls"] == 3 and body["estimated_calls"] == total["estimated_calls"]
    assert body["estimated_cost_usd"] == pytest.approx(total["estimated_cost_usd"])
    _code, _, series = client.get(
        f"/api/timeseries?since={since}&until={until}&bucket=1h&by=provider"
    )
    assert sum(sum(s["calls"]) for s in series["series"]) == total["calls"]
    assert sum(sum(s["cost_usd"]) for s in series["series"]) == pytest.approx(total["cost_usd"])

    client.writer.write(
        [
            {
                "id": "late",
                "kind": "call",
                "ts": T0 + 7200.5,
                "provider": "openai",
                "cost_usd": 5.0,
                "context": {"customer_id": "c1"},
            }
        ]
    )
    same_report("customer")
    _code, _, body = client.get(f"/api/summary?since={since}&until={until}")
    assert body["calls"] == total["calls"] + 1
    assert body["cost_usd"] == pytest.approx(total["cost_usd"] + 5.0)
