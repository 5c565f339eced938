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
        root = collector_root(runner, self.writer, self.links)  # type: ignore[arg-type]
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
    """/ names the endpoints; an unknown path is a 404."""
    code, _, body = client.get("/")
    assert code == 200 and "/api/events" in body["endpoints"]
    results: list[Any] = []
    client.treq.get("http://127.0.0.1:8000/nope").addCallback(results.append)
    client.treq.flush()
    assert results[0].code == 404


def test_dashboard_is_a_page_of_the_report(client: Client) -> None:
    """/dashboard: totals, cost by provider/model, customer and section, the latest calls,
    all in plain escaped HTML over the chosen window."""
    client.writer.write(
        [
            {
                "id": "x",
                "kind": "call",
                "ts": T0 + 30,
                "provider": "openai",
                "model": "<script>alert(1)</script>",
                "cost_usd": 0.5,
                "context": {"customer_id": "acme"},
            }
        ]
    )
    results: list[Any] = []
    d = client.treq.get(f"http://127.0.0.1:8000/dashboard?since={T0 - 1}")
    d.addCallback(
        lambda r: client.treq.text_content(r).addCallback(lambda t: results.append((r, t)))
    )
    client.treq.flush()
    ((response, page),) = results
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert "<b>3</b> calls" in page and "$4.500000" in page
    assert "By provider and model" in page and "By customer" in page and "By section" in page
    assert "<td>acme</td>" in page and "<td>globex</td>" in page and "<td>plan</td>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    _, _, body = client.get("/")
    assert "/dashboard" in body["endpoints"]


def test_dashboard_default_window_is_the_last_day(client: Client) -> None:
    """Without since, the page covers the last 24 hours (the fixture's calls are older)."""
    results: list[Any] = []
    d = client.treq.get("http://127.0.0.1:8000/dashboard")
    d.addCallback(lambda r: client.treq.text_content(r).addCallback(results.append))
    client.treq.flush()
    assert "<b>0</b> calls" in results[0] and "no priced calls" in results[0]
    bad = client.get("/dashboard?since=yesterday-ish")
    assert bad[0] == 400


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


def test_report_and_dashboard_survive_extreme_stored_values(client: Client) -> None:
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
    assert _status(client, "/dashboard?since=0") == 200


def _status(client: Client, path: str) -> int:
    """The status of one GET (any body)."""
    results: list[Any] = []
    d = client.treq.get("http://127.0.0.1:8000" + path)
    d.addCallback(lambda r: client.treq.content(r).addCallback(lambda _: results.append(r.code)))
    d.addErrback(results.append)
    client.treq.flush()
    assert len(results) == 1 and isinstance(results[0], int), results
    return int(results[0])


_ROUTES = ["/api/events", "/api/report", "/dashboard", "/health", "/"]
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
