"""The dashboard's login in memory: the session store (Clock), the cookie's
attributes, the login and logout forms, and the cookie on C{/api} (treq's
StubTreq over the same tree the collector builds with C{--require-keys})."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from llmobserve.collector._auth import VERDICT_TTL, KeyVerifier
from llmobserve.collector._budgets import Budget
from llmobserve.collector._http import collector_root
from llmobserve.collector._limits import RateLimit
from llmobserve.collector._link import LinkRegistry
from llmobserve.collector._service import _guard
from llmobserve.collector._sessions import COOKIE_NAME, SESSION_TTL, DashboardSessions
from llmobserve.collector._store import EventStore
from llmobserve.collector._thread import StoreThread
from llmobserve.collector._writer import BatchWriter

ORIGIN = "http://127.0.0.1:8000"


class SyncRunner:
    """Runs store jobs at once (a store thread stand-in)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def submit(self, job: Callable[[EventStore], Any]) -> Deferred[Any]:
        try:
            return succeed(job(self.store))
        except Exception as e:
            return fail(e)


# the session store


def test_a_session_id_is_random_never_the_key_and_ends_after_its_ttl() -> None:
    """Two logins with one key get two unrelated ids, neither containing the
    key; each maps to the key until the TTL has passed, then to nothing."""
    clock = Clock()
    sessions = DashboardSessions(clock)
    key = "llmo_" + "k" * 43
    first, second = sessions.open(key), sessions.open(key)
    assert first != second and key not in first and key not in second
    assert len(first) >= 43  # 256 random bits
    assert sessions.key_for(first) == key
    clock.advance(SESSION_TTL - 1)
    assert sessions.key_for(second) == key
    clock.advance(1)
    assert sessions.key_for(first) is None and sessions.key_for(second) is None
    assert len(sessions) == 0


def test_unknown_ids_logout_and_a_full_table() -> None:
    """An unknown or empty id maps to nothing; close ends one session; past
    the limit the oldest session is dropped first (expired ones before it)."""
    clock = Clock()
    sessions = DashboardSessions(clock, limit=3)
    assert sessions.key_for(None) is None and sessions.key_for("") is None
    assert sessions.key_for("no-such-session") is None
    ids = [sessions.open(f"key-{i}") for i in range(3)]
    sessions.close(ids[1])
    assert sessions.key_for(ids[1]) is None
    ids.append(sessions.open("key-3"))
    ids.append(sessions.open("key-4"))  # full: key-0 (the oldest) goes
    assert len(sessions) == 3
    assert [sessions.key_for(i) for i in ids] == [None, None, "key-2", "key-3", "key-4"]


# the tree with --require-keys


class Collector:
    """The collector's HTTP tree with keys required, over a real store."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = EventStore(tmp_path / "x.sqlite3")
        self.clock = Clock()
        runner = SyncRunner(self.store)
        writer = BatchWriter(runner)
        self.verifier = KeyVerifier(cast(StoreThread, runner), self.clock)
        self.sessions = DashboardSessions(self.clock)
        self.root = collector_root(runner, writer, LinkRegistry())  # type: ignore[arg-type]  # SyncRunner
        _guard(self.root, cast(StoreThread, runner), self.verifier, self.sessions)
        writer.write(
            [
                {"id": "a1", "kind": "call", "ts": 1.0, "project": "team-a", "cost_usd": 1.0},
                {"id": "b1", "kind": "call", "ts": 2.0, "project": "team-b", "cost_usd": 2.0},
            ],
            "p",
            1,
        )

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        origin: str = ORIGIN,
    ) -> tuple[int, Any, bytes]:
        """One request from a fresh client (no cookie jar): code, headers, body."""
        treq: Any = StubTreq(self.root)  # type: ignore[no-untyped-call]  # treq is untyped
        sent = dict(headers or {})
        data = None
        if form is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
            data = urlencode(form).encode()
        results: list[Any] = []
        d = treq.request(method, origin + path, headers=sent, data=data, allow_redirects=False)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda body: results.append((r, body))))
        d.addErrback(results.append)
        treq.flush()
        assert len(results) == 1, results
        response, body = results[0]
        return response.code, response.headers, body

    def login(self, key: str, **headers: str) -> tuple[int, Any, bytes]:
        sent = {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin", **headers}
        return self.request("POST", "/dashboard/login", sent, {"key": key})


def _cookie(headers: Any) -> str:
    """The session cookie's C{name=value} from a response's C{Set-Cookie}."""
    (raw,) = headers.getRawHeaders("set-cookie")
    return str(raw).split(";")[0]


def _attributes(headers: Any) -> set[str]:
    (raw,) = headers.getRawHeaders("set-cookie")
    return {part.strip().lower() for part in str(raw).split(";")[1:]}


@pytest.fixture
def collector(tmp_path: Path) -> Collector:
    return Collector(tmp_path)


def test_the_page_redirects_to_a_login_form_served_from_the_package(
    collector: Collector,
) -> None:
    """Without a session, C{/dashboard} is a 303 to the login page: a form
    posting to itself, with the page's strict policy; the script and style
    are served without a login."""
    code, headers, _ = collector.request("GET", "/dashboard")
    assert code == 303 and headers.getRawHeaders("location") == ["/dashboard/login"]
    code, headers, body = collector.request("GET", "/dashboard/login")
    assert code == 200 and b'action="/dashboard/login"' in body
    assert b'type="password" name="key"' in body
    policy = headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'self'" in policy and "form-action 'self'" in policy
    assert collector.request("GET", "/dashboard/app.js")[0] == 200
    assert collector.request("GET", "/dashboard/app.css")[0] == 200


def test_a_read_key_logs_in_with_a_strict_http_only_cookie_that_is_not_the_key(
    collector: Collector,
) -> None:
    """A read key's login answers 303 to the page with a cookie
    C{HttpOnly; SameSite=Strict; Path=/} (C{Secure} only over TLS) whose
    value is not the key; with it the page shows its logout button."""
    _, key = collector.store.keys.create("reader", project="team-a", scope="read")
    code, headers, _ = collector.login(key)
    assert code == 303 and headers.getRawHeaders("location") == ["/dashboard"]
    cookie = _cookie(headers)
    name, _, value = cookie.partition("=")
    assert name == COOKIE_NAME.decode() and value and key not in value
    assert _attributes(headers) >= {"httponly", "samesite=strict", "path=/"}
    assert "secure" not in _attributes(headers)
    code, _, page = collector.request("GET", "/dashboard", {"Cookie": cookie})
    assert code == 200 and b'id="logout"' in page and b'id="logout" hidden' not in page
    https = "https://127.0.0.1:8443"
    code, headers, _ = collector.request(
        "POST",
        "/dashboard/login",
        {"Origin": https, "Sec-Fetch-Site": "same-origin"},
        {"key": key},
        origin=https,
    )
    assert code == 303 and "secure" in _attributes(headers)


def test_a_read_session_reads_its_project_only_and_never_changes_anything(
    collector: Collector,
) -> None:
    """With the cookie, C{GET /api/*} answers as the key would: a read
    key's project only, whatever the address asks; a state-changing request
    with the cookie (and no key) is refused."""
    _, key = collector.store.keys.create("reader", project="team-a", scope="read")
    cookie = _cookie(collector.login(key)[1])
    code, _, body = collector.request("GET", "/api/events?project=team-b", {"Cookie": cookie})
    assert code == 200 and b'"a1"' in body and b'"b1"' not in body
    code, headers, _ = collector.request(
        "POST", "/api/keys", {"Cookie": cookie, "Content-Type": "application/json"}
    )
    assert code == 401 and headers.getRawHeaders("x-llmobserve-error") == ["unauthorized"]
    assert collector.request("GET", "/api/events")[0] == 401


def test_a_project_key_reads_only_the_budgets_and_limits_that_apply_to_its_project(
    collector: Collector,
) -> None:
    """C{GET /api/budgets} and C{/api/limits} with team A's read key list the
    definitions of no project and team A's, never team B's (nor its spend),
    whatever the address asks; an admin key lists them all, or one
    project's with C{?project=}; a proxy's link key (ingest) lists them all,
    since its clients' keys may be of any project."""
    book = collector.store.budget_book()
    book.set(Budget("everyone", 10.0, "day"))
    book.set(Budget("a-cap", 1.0, "day", project="team-a"))
    book.set(Budget("b-secret", 2.0, "day", project="team-b"))
    book.limits.set(RateLimit("a-rpm", 60, project="team-a"))
    book.limits.set(RateLimit("b-rpm", 30, project="team-b"))
    book.close()
    _, reader = collector.store.keys.create("reader", project="team-a", scope="read")
    _, admin = collector.store.keys.create("admin", scope="admin")
    _, link = collector.store.keys.create("proxy", project="team-a", scope="ingest")

    def names(key: str, path: str) -> set[str]:
        code, _, body = collector.request("GET", path, {"Authorization": f"Bearer {key}"})
        assert code == 200, body
        rows = json.loads(body)["budgets" if "budgets" in path else "limits"]
        return {row["name"] for row in rows}

    assert names(reader, "/api/budgets?project=team-b") == {"everyone", "a-cap"}
    assert names(reader, "/api/limits") == {"a-rpm"}
    assert names(admin, "/api/budgets") == {"everyone", "a-cap", "b-secret"}
    assert names(admin, "/api/budgets?project=team-b") == {"everyone", "b-secret"}
    assert names(link, "/api/budgets") == {"everyone", "a-cap", "b-secret"}
    assert names(link, "/api/limits") == {"a-rpm", "b-rpm"}


def test_wrong_ingest_and_revoked_keys_get_no_session(collector: Collector) -> None:
    """A wrong key (401), an ingest key (403) and an empty form (401) get
    the form again with why, never the key, and no cookie."""
    _, ingest = collector.store.keys.create("proxy", project="team-a", scope="ingest")
    wrong = "llmo_" + "w" * 43
    for key, status in ((wrong, 401), (ingest, 403), ("", 401)):
        code, headers, body = collector.login(key)
        assert code == status and b'id="login-error"' in body
        assert headers.getRawHeaders("set-cookie") is None
        assert key.encode() not in body or key == ""


def test_a_revoked_key_ends_its_session_within_the_verdict_ttl(collector: Collector) -> None:
    """Revoked in the store (the running collector is not told), the key's
    session still reads until the verdict cache expires, then gets 401 and
    the session is gone: the page sends the browser back to the login."""
    _, key = collector.store.keys.create("reader", project="team-a", scope="read")
    cookie = _cookie(collector.login(key)[1])
    collector.store.keys.revoke("reader")
    assert collector.request("GET", "/api/summary", {"Cookie": cookie})[0] == 200
    collector.clock.advance(VERDICT_TTL)
    code, _, body = collector.request("GET", "/api/summary", {"Cookie": cookie})
    assert code == 401 and b"revoked" in body
    assert len(collector.sessions) == 0
    code, headers, _ = collector.request("GET", "/dashboard", {"Cookie": cookie})
    assert code == 303 and headers.getRawHeaders("location") == ["/dashboard/login"]


def test_cross_site_posts_are_refused(collector: Collector) -> None:
    """A login or logout posted from another site (by C{Sec-Fetch-Site} or
    by C{Origin}, including C{null}) is a 403 and sets no cookie."""
    _, key = collector.store.keys.create("reader", project="team-a", scope="read")
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:8001"},
        {"Origin": "https://127.0.0.1:8000"},
    ):
        code, response, body = collector.request("POST", "/dashboard/login", headers, {"key": key})
        assert code == 403 and b"forbidden" in body, headers
        assert response.getRawHeaders("set-cookie") is None
        assert collector.request("POST", "/dashboard/logout", headers)[0] == 403
    assert len(collector.sessions) == 0


def test_logout_ends_the_session_and_clears_the_cookie(collector: Collector) -> None:
    """After C{POST /dashboard/logout} the old cookie reads nothing."""
    _, key = collector.store.keys.create("admin", scope="admin")
    cookie = _cookie(collector.login(key)[1])
    assert collector.request("GET", "/api/events", {"Cookie": cookie})[0] == 200
    code, headers, _ = collector.request(
        "POST", "/dashboard/logout", {"Cookie": cookie, "Origin": ORIGIN}
    )
    assert code == 303 and headers.getRawHeaders("location") == ["/dashboard/login"]
    assert "max-age=0" in _attributes(headers)
    code, _, body = collector.request("GET", "/api/events", {"Cookie": cookie})
    assert code == 401 and b"log in again" in body
    assert collector.request("GET", "/dashboard", {"Cookie": cookie})[0] == 303


def test_a_bearer_key_still_opens_the_page(collector: Collector) -> None:
    """Scripts keep C{Authorization: Bearer}: a read key gets the page, a
    wrong one a 401 with the error contract."""
    _, key = collector.store.keys.create("reader", project="team-a", scope="read")
    assert collector.request("GET", "/dashboard", {"Authorization": f"Bearer {key}"})[0] == 200
    code, headers, _ = collector.request("GET", "/dashboard", {"Authorization": "Bearer llmo_x"})
    assert code == 401 and headers.getRawHeaders("x-llmobserve-error") == ["unauthorized"]


def test_without_required_keys_the_dashboard_has_no_login(tmp_path: Path) -> None:
    """On loopback without C{--require-keys} the page is open as before, with
    no logout button, and C{/dashboard/login} is a 303 to it."""
    runner = SyncRunner(EventStore(tmp_path / "x.sqlite3"))
    root = collector_root(runner, BatchWriter(runner), LinkRegistry())  # type: ignore[arg-type]  # SyncRunner
    treq: Any = StubTreq(root)  # type: ignore[no-untyped-call]  # treq is untyped
    results: list[Any] = []
    for path in ("/dashboard", "/dashboard/login"):
        d = treq.get(ORIGIN + path, allow_redirects=False)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda b: results.append((r, b))))
        treq.flush()
    (page, body), (login, _) = results
    assert page.code == 200 and b'id="logout" hidden' in body
    assert login.code == 303 and login.headers.getRawHeaders("location") == ["/dashboard"]


def test_a_request_without_is_secure_is_secure_on_a_tls_transport() -> None:
    """The proxy's own request objects have no C{isSecure}: their transport
    tells whether the cookie gets C{Secure}."""
    from types import SimpleNamespace

    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    from llmobserve.collector._sessions import is_secure

    tls, plain = SimpleNamespace(), SimpleNamespace()
    directlyProvides(tls, ISSLTransport)
    assert is_secure(cast(Any, SimpleNamespace(transport=tls)))
    assert not is_secure(cast(Any, SimpleNamespace(transport=plain)))
    assert not is_secure(cast(Any, SimpleNamespace()))
