"""C{/api/limits} in memory (treq's StubTreq over the collector's resource
tree), on a SQLite store and on a PostgreSQL one; and the rate limits'
slices through C{POST /api/budgets/grants}."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from collector.test_http import Client

from llmobserve.collector import Budget, RateLimit


class LimitsClient(Client):
    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        results: list[Any] = []
        data = None if body is None else json.dumps(body).encode()
        d = self.treq.request(method, "http://127.0.0.1:8000" + path, data=data)
        d.addCallback(
            lambda r: self.treq.json_content(r).addCallback(lambda b: results.append((r.code, b)))
        )
        d.addErrback(results.append)
        self.treq.flush()
        assert len(results) == 1, results
        code, answer = results[0]
        return code, answer


@pytest.fixture(params=["sqlite", "postgres"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LimitsClient]:
    store = None
    if request.param == "postgres":
        from llmobserve.collector._pgstore import PgEventStore

        store = PgEventStore(request.getfixturevalue("pg_url"))
    c = LimitsClient(tmp_path, store)
    yield c
    c.store.close()


def test_limits_set_list_and_delete_over_http(client: LimitsClient) -> None:
    """POST or PUT a limit (replacing one of that name), GET lists them with
    the current minute's use, DELETE removes one (404 when there is none);
    a bad definition is a 400 with the reason."""
    code, body = client.call("POST", "/api/limits", {"name": "rpm", "per_minute": 5})
    assert code == 200 and body == {"limit": {"name": "rpm", "per_minute": 5, "unit": "calls"}}
    tpm = {"name": "tpm", "per_minute": 900, "unit": "tokens", "model": "gpt-4o", "fail": "open"}
    assert client.call("PUT", "/api/limits", tpm)[0] == 200
    assert client.call("PUT", "/api/limits", {"name": "rpm", "per_minute": 7})[0] == 200
    client.writer.write(
        [
            {"id": "a", "kind": "call", "ts": time.time(), "provider": "openai", "model": "m"},
            {"id": "b", "kind": "call", "ts": time.time() - 3600, "provider": "openai"},
        ]
    )
    code, body = client.call("GET", "/api/limits")
    assert code == 200
    rows = {r["name"]: r for r in body["limits"]}
    assert rows["rpm"]["per_minute"] == 7 and rows["tpm"]["fail"] == "open"
    # the call of this minute counts (unless the minute rolled in between)
    assert rows["rpm"]["used"] in (0, 1) and rows["tpm"]["used"] == 0
    assert rows["rpm"]["window_start"] % 60 == 0
    assert RateLimit.from_dict(
        {k: v for k, v in rows["tpm"].items() if k not in ("used", "window_start")}
    )
    code, body = client.call("POST", "/api/limits", {"name": "x", "per_minute": -1})
    assert code == 400 and "per_minute must not be negative" in body["error"]["message"]
    code, body = client.call("POST", "/api/limits", {"name": "x", "per_minute": 1, "fail": "ajar"})
    assert code == 400 and "fail must be one of" in body["error"]["message"]
    assert client.call("DELETE", "/api/limits/tpm") == (200, {"deleted": "tpm"})
    code, body = client.call("DELETE", "/api/limits/tpm")
    assert code == 404 and body["error"]["message"] == "no limit named 'tpm'"
    assert [r["name"] for r in client.call("GET", "/api/limits")[1]["limits"]] == ["rpm"]


def test_rate_grants_through_the_budgets_grant_route(client: LimitsClient) -> None:
    """C{POST /api/budgets/grants} with C{limits} reports hands out slices of
    this minute and the next (never another minute, never an unknown
    limit), never more than the limit together."""
    assert client.call("POST", "/api/limits", {"name": "rpm", "per_minute": 8})[0] == 200
    minute = RateLimit("rpm", 8).window_start(time.time())
    granted: dict[str, int] = {"a": 0, "b": 0}
    for _ in range(10):
        for holder in ("a", "b"):
            reports = [
                {"limit": "rpm", "window": m, "used": granted[holder], "busy": granted[holder]}
                for m in (minute, minute - 120)
            ] + [{"limit": "gone", "window": minute, "used": 0, "busy": 0}]
            code, body = client.call(
                "POST",
                "/api/budgets/grants",
                {"holder": holder, "reports": [], "limits": reports},
            )
            assert code == 200 and body["grants"] == {}
            if "rpm" not in body["limit_grants"]:  # the minute rolled: start again
                continue
            [(got_minute, got)] = body["limit_grants"]["rpm"]
            assert got_minute == minute
            granted[holder] = got
    assert 0 < granted["a"] + granted["b"] <= 8
    code, body = client.call(
        "POST",
        "/api/budgets/grants",
        {"holder": "c", "reports": [], "limits": [{"limit": "rpm", "window": "x"}]},
    )
    assert code == 400


class RawClient(LimitsClient):
    def raw(self, path: str, data: bytes) -> tuple[int, Any]:
        results: list[Any] = []
        d = self.treq.request("POST", "http://127.0.0.1:8000" + path, data=data)
        d.addCallback(
            lambda r: self.treq.json_content(r).addCallback(lambda b: results.append((r.code, b)))
        )
        d.addErrback(results.append)
        self.treq.flush()
        assert len(results) == 1, results
        code, answer = results[0]
        return code, answer


@pytest.mark.parametrize(("route", "what"), [("/api/budgets", "budget"), ("/api/limits", "limit")])
def test_a_definition_that_is_not_one_is_refused_with_its_reason(
    tmp_path: Path, route: str, what: str
) -> None:
    """Budgets and limits read a POST alike: not JSON, or JSON but not an
    object, is a 400 naming the kind of definition; past 64 KiB a 413; and
    nothing is stored."""
    client = RawClient(tmp_path, None)
    try:
        for data in (b"{", b"[1, 2]", b'"x"'):
            code, body = client.raw(route, data)
            assert code == 400, data
            assert body["error"]["type"] == "bad_request"
            assert body["error"]["message"].startswith(f"bad {what}: "), body
        code, body = client.raw(route, b'{"name": "' + b"x" * 70_000 + b'"}')
        assert code == 413 and body["error"]["type"] == "body_too_large"
        assert body["error"]["message"] == f"a {what} is a small JSON object"
        listed = client.call("GET", route)[1]
        assert listed[what + "s"] == []
    finally:
        client.store.close()


def test_budget_grants_make_room_for_a_call_a_proxy_wanted(client: LimitsClient) -> None:
    """A proxy's budget report may say C{want}: the most a call it refused
    for want of grant could cost. Its grant is topped up to that much when
    the limit has it (a $0.02 call against a $0.05 budget, whose slice is
    $0.0125, was refused for ever); a report without it (an older proxy)
    gets a slice as before."""
    budget = {"name": "cap", "limit_usd": 0.05, "window": "day"}
    assert client.call("POST", "/api/budgets", budget)[0] == 200
    window = Budget("cap", 0.05, "day").window_start(time.time())

    def ask(**report: Any) -> int:
        code, body = client.call(
            "POST",
            "/api/budgets/grants",
            {"holder": "p", "reports": [{"budget": "cap", "window": window, **report}]},
        )
        assert code == 200, body
        [got_window, got] = body["grants"]["cap"]
        assert got_window == window
        return int(got)

    assert ask(spent=0, busy=0) == 12_500_000  # a quarter of $0.05
    assert ask(spent=0, busy=0, want=20_000_000) == 20_000_000
    assert ask(spent=0, busy=0, want=90_000_000) == 50_000_000  # never past the limit


def test_a_stopping_proxy_gives_its_grants_back(client: LimitsClient) -> None:
    """C{"release": true}: a stopping proxy's grants shrink to what it spent
    and has in flight, so the others can take the rest (a silent holder's
    grant stays counted until its window ends)."""
    assert (
        client.call("POST", "/api/budgets", {"name": "cap", "limit_usd": 1.0, "window": "day"})[0]
        == 200
    )
    window = Budget("cap", 1.0, "day").window_start(time.time())

    def ask(holder: str, busy: int, **extra: Any) -> Any:
        report = {"budget": "cap", "window": window, "spent": busy, "busy": busy}
        code, body = client.call(
            "POST", "/api/budgets/grants", {"holder": holder, "reports": [report], **extra}
        )
        assert code == 200, body
        return body

    assert ask("a", 0)["grants"]["cap"] == [window, 250_000_000]
    assert ask("a", 10_000_000, release=True) == {"grants": {}, "released": True}
    got = 0
    for _ in range(10):
        got = ask("b", got)["grants"]["cap"][1]
    assert got == 990_000_000  # all but what a spent


@pytest.mark.parametrize(
    ("route", "what", "definition"),
    [
        ("/api/budgets", "budget", {"name": "b", "limit_usd": 5, "window": "day"}),
        ("/api/limits", "limit", {"name": "l", "per_minute": 60, "unit": "calls"}),
    ],
)
def test_a_scope_on_an_unknown_provider_is_refused_naming_the_closest(
    tmp_path: Path, route: str, what: str, definition: dict[str, Any]
) -> None:
    """A budget on provider 'opneai' was stored, and matched no call: it
    never applied (a new user's finding). The routes refuse an id the
    registry does not know, with the one it is closest to; a known id is kept."""
    client = RawClient(tmp_path, None)
    try:
        typo = json.dumps({**definition, "provider": "opneai"}).encode()
        code, body = client.raw(route, typo)
        assert code == 400 and body["error"]["type"] == "bad_request"
        assert body["error"]["message"] == (
            f"bad {what}: provider: unknown provider 'opneai'; did you mean 'openai'?"
        )
        assert client.call("GET", route)[1][what + "s"] == []
        code, _ = client.raw(route, json.dumps({**definition, "provider": "openai"}).encode())
        assert code == 200
        listed = client.call("GET", route)[1][what + "s"]
        assert [d["provider"] for d in listed] == ["openai"]
    finally:
        client.store.close()
