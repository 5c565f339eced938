"""Budget definitions in the store: validation, scopes, windows, spend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from collector.test_store import T0, call

from llmobserve._budgetcli import store_book
from llmobserve.cli import main
from llmobserve.collector import (
    Budget,
    BudgetError,
    RateLimit,
    SqlBudgetBook,
    SQLiteBudgetBook,
    open_store,
)


def test_definition_is_checked() -> None:
    """Unknown windows, actions, time zones and negative limits are refused."""
    for bad in (
        {"window": "week"},
        {"action": "stop"},
        {"tz": "Nowhere/City"},
        {"limit_usd": -1.0},
        {"limit_usd": float("nan")},
        {"unpriced": "maybe"},
    ):
        with pytest.raises(BudgetError):
            Budget(**{"name": "b", "limit_usd": 1.0, **bad})  # type: ignore[arg-type]  # deliberately bad values
    with pytest.raises(BudgetError, match="unknown budget fields"):
        Budget.from_dict({"name": "b", "limit_usd": 1.0, "colour": "red"})


def test_windows_in_utc_and_a_named_zone() -> None:
    """hour/day/month windows start on the boundary of their zone; total never starts."""
    # T0 = 2025-06-15T15:06:40Z
    assert Budget("b", 1, "hour").window_start(T0) == 1_749_999_600.0  # 15:00Z
    assert Budget("b", 1, "day").window_start(T0) == 1_749_945_600.0  # 2025-06-15T00:00Z
    assert Budget("b", 1, "month").window_start(T0) == 1_748_736_000.0  # 2025-06-01T00:00Z
    assert Budget("b", 1, "total").window_start(T0) == float("-inf")
    # New York is UTC-4 in June: its day began at 04:00Z
    ny = Budget("b", 1, "day", tz="America/New_York")
    assert ny.window_start(T0) == 1_749_960_000.0
    assert ny.window_end(T0) == 1_749_960_000.0 + 86400
    month = Budget("b", 1, "month")
    assert month.window_start(month.window_end(T0)) == month.window_end(T0)  # July 1st


def test_scopes_combine_and_section_is_a_prefix() -> None:
    """Every scope field set must match; a section scope covers nested sections."""
    b = Budget("b", 1, customer="acme", model="gpt-4o", section="plan")
    assert b.matches("openai", "gpt-4o", "acme", None, "plan/step1")
    assert b.matches("openai", "gpt-4o-2024-08-06", "acme", None, "plan")
    assert not b.matches("openai", "gpt-4o-mini", "acme", None, "plan")
    assert not b.matches("openai", "gpt-4o", "other", None, "plan")
    assert not b.matches("openai", "gpt-4o", "acme", None, "planning")
    assert not b.matches("openai", "gpt-4o", "acme", None, None)
    assert Budget("b", 1, provider="anthropic", tenant="t1").matches(
        "anthropic", "x", None, "t1", None
    )
    assert not Budget("b", 1, provider="anthropic").matches("openai", "x", None, None, None)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The C{--db} of a store: a SQLite file, or a PostgreSQL database (a
    real server, tests/support/postgres.py): the budget book's contract is
    kept by both."""
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    url: str = request.getfixturevalue("pg_url")
    return url


def _book(db: str) -> SqlBudgetBook:
    return store_book(db)


def test_a_project_scope_matches_the_key_s_project_only() -> None:
    """A project scope matches calls whose key is of that project; a call
    with no key (no project) or another project's key is outside it, and
    a budget with no project scope takes calls of every project."""
    b = Budget("b", 1, project="alpha", model="gpt-4o")
    assert b.matches("openai", "gpt-4o", None, None, None, "alpha")
    assert not b.matches("openai", "gpt-4o", None, None, None, "beta")
    assert not b.matches("openai", "gpt-4o", None, None, None, None)
    assert not b.matches("openai", "gpt-4o-mini", None, None, None, "alpha")
    assert Budget("b", 1).matches("openai", "gpt-4o", None, None, None, "alpha")
    limit = RateLimit("r", 5, project="alpha")
    assert limit.matches("openai", "m", None, None, None, "alpha")
    assert not limit.matches("openai", "m", None, None, None, None)
    assert b.scope() == {"model": "gpt-4o", "project": "alpha"}
    assert Budget.from_dict(b.as_dict()) == b
    assert not b.counts_same(Budget("b", 1, project="beta", model="gpt-4o"))


def test_a_project_budget_sums_that_project_s_spend(db: str) -> None:
    """spend() and used() of a project scope count the events whose
    C{project} is that project (kept in the store's extra JSON), on
    either back end."""
    store = open_store(db)
    store.insert(
        [
            call(0, cost_usd=0.25, project="alpha"),
            call(1, cost_usd=0.5, project="beta"),
            call(2, cost_usd=1.0),  # no key: no project
            call(3, cost_usd=2.0, project="alpha"),
        ]
    )
    store.close()
    book = _book(db)
    now = T0 + 10
    assert book.spend(Budget("b", 1, "day", project="alpha"), now) == 2.25
    assert book.spend(Budget("b", 1, "day", project="beta"), now) == 0.5
    assert book.spend(Budget("b", 1, "day", project="gamma"), now) == 0.0
    assert book.spend(Budget("b", 1, "day"), now) == 3.75
    assert book.used(RateLimit("c", 10, project="alpha"), now) == 2


def _store_with_calls(path: str | Path) -> None:
    store = open_store(path)
    store.insert(
        [
            call(0, cost_usd=0.25),
            call(1, cost_usd=0.5, model="gpt-4o-2024-08-06"),
            call(2, cost_usd=1.0, model="gpt-4o-mini"),
            call(3, cost_usd=2.0, context={"customer_id": "bob", "section_path": "plan/a"}),
            call(4, cost_usd=None),
            call(5, cost_usd=4.0, ts=T0 - 86400),  # yesterday
        ]
    )
    store.close()


def test_status_gives_spend_and_room_to_the_nano_dollar(db: str) -> None:
    """`budgets list --format json` gave remaining_usd 0.00044000000000000007
    (a new user's finding): the status rows are rounded to the nano-dollar,
    as the ledger counts, so a sum of floats shows as the figures it is."""
    store = open_store(db)
    store.insert([call(i, cost_usd=0.1) for i in range(3)])
    store.close()
    book = _book(db)
    book.set(Budget("b", 0.3004, "day"))
    [row] = book.status(T0 + 10)
    assert 0.1 + 0.1 + 0.1 != 0.3  # what the sum alone gives
    assert (row["spend_usd"], row["remaining_usd"]) == (0.3, 0.0004)
    assert json.dumps(row["remaining_usd"]) == "0.0004"
    book.close()


def test_spend_sums_the_scope_in_the_window(db: str) -> None:
    """spend() counts priced calls of the scope since the window began, the
    same way Budget.matches counts a call in the proxy."""
    _store_with_calls(db)
    book = _book(db)
    now = T0 + 10
    assert book.spend(Budget("b", 1, "total"), now) == 7.75
    assert book.spend(Budget("b", 1, "day"), now) == 3.75
    assert book.spend(Budget("b", 1, "day", model="gpt-4o"), now) == 2.75
    assert book.spend(Budget("b", 1, "day", customer="acme"), now) == 1.75
    # calls 0-2 send only the section label "plan", call 3 the path "plan/a":
    # both count, as the proxy matches (the label when no path is sent)
    assert book.spend(Budget("b", 1, "day", section="plan"), now) == 3.75
    assert book.spend(Budget("b", 1, "day", provider="anthropic"), now) == 0.0
    book.close()


def test_book_set_list_delete(db: str) -> None:
    """set replaces by name; list is by name; delete says whether it found one."""
    book = _book(db)
    assert book.spend(Budget("b", 1), T0) == 0.0  # no events (SQLite: no events table yet)
    book.set(Budget("b", 1.0))
    book.set(Budget("a", 2.0, "day", customer="acme"))
    book.set(Budget("b", 3.0))
    assert [(b.name, b.limit_usd) for b in book.list()] == [("a", 2.0), ("b", 3.0)]
    assert book.delete("a") and not book.delete("a")
    book.close()


def test_definitions_a_newer_version_wrote_are_skipped_not_fatal(db: str) -> None:
    """Budgets and rate limits share one kind of table: set replaces by
    name, list is in byte order of the names (on PostgreSQL too, whatever
    its collation), and a row that no longer parses (not JSON, a field this
    version does not know) is left out of the list instead of failing it."""
    book = _book(db)
    for b in (Budget("b", 1.0), Budget("B", 2.0), Budget("a", 3.0), Budget("b", 4.0)):
        book.set(b)
    for limit in (RateLimit("z", 10), RateLimit("Z", 20, "tokens"), RateLimit("z", 30)):
        book.limits.set(limit)
    for table, name, text in [
        ("budgets", "broken", "{not json"),
        ("budgets", "newer", '{"name": "newer", "limit_usd": 1, "surge": 2}'),
        ("rate_limits", "newer", '{"name": "newer", "per_minute": 1, "burst": 5}'),
    ]:
        book.connection.execute(
            f"INSERT INTO {table} (name, definition, updated_at) VALUES (?, ?, 0)", (name, text)
        )
    assert [(b.name, b.limit_usd) for b in book.list()] == [("B", 2.0), ("a", 3.0), ("b", 4.0)]
    assert [(r.name, r.per_minute) for r in book.limits.list()] == [("Z", 20), ("z", 30)]
    assert book.limits.delete("z") and not book.limits.delete("z")
    assert book.delete("broken")  # a row that does not parse can still be deleted
    book.close()


def test_cli_budgets_and_report(db: str, capsys: Any) -> None:
    """budgets set/list/delete on a store (--db FILE or postgresql://);
    report shows spend vs limit."""
    import io

    _store_with_calls(db)
    out = io.StringIO()
    where = ["--db", db]
    assert (
        main(
            [
                "budgets",
                "set",
                "--name",
                "acme",
                "--limit-usd",
                "10",
                "--window",
                "total",
                "--customer",
                "acme",
                *where,
            ],
            out,
        )
        == 0
    )
    assert main(["budgets", "list", "--format", "json", *where], out) == 0
    text = out.getvalue()
    assert '"spend_usd": 5.75' in text and '"remaining_usd": 4.25' in text
    out = io.StringIO()
    assert main(["report", *where], out) == 0
    assert "acme: $5.75 of $10 (58%) so far; $10 in total," in out.getvalue()
    assert main(["budgets", "delete", "acme", *where], out) == 0
    assert main(["budgets", "delete", "acme", *where], out) == 1
    assert "no budget named 'acme'" in capsys.readouterr().err


def test_cli_budgets_and_limits_take_a_project(tmp_path: Path) -> None:
    """C{budgets set --project P} and C{limits set --project P} keep the
    scope; list and report name it."""
    import io

    path = tmp_path / "s.db"
    db = ["--db", str(path)]
    out = io.StringIO()
    set_args = ["--name", "alpha", "--limit-usd", "5", "--window", "day", "--project", "alpha"]
    assert main(["budgets", "set", *set_args, *db], out) == 0
    assert "project=alpha" in out.getvalue()
    assert (
        main(
            [
                "limits",
                "set",
                "--name",
                "rpm",
                "--calls-per-minute",
                "3",
                "--project",
                "alpha",
                *db,
            ],
            out,
        )
        == 0
    )
    book = SQLiteBudgetBook(path)
    assert [b.project for b in book.list()] == ["alpha"]
    assert [r.project for r in book.limits.list()] == ["alpha"]
    book.close()
    out = io.StringIO()
    assert main(["budgets", "list", "--format", "json", *db], out) == 0
    assert '"project": "alpha"' in out.getvalue()
    out = io.StringIO()
    assert main(["report", *db], out) == 0
    assert "alpha: $0 of $5 (0%) this day; $5 per day (UTC), project=alpha" in out.getvalue()


def test_rate_limit_usage_in_the_current_minute(db: str, capsys: Any) -> None:
    """used() counts the calls (or tokens) of a limit's scope since its minute
    began, leaving out calls that never reached an upstream; C{llmobserve
    limits} keeps them in the same store."""
    from llmobserve.collector import RateLimit

    store = open_store(db)
    store.insert(
        [
            call(0),  # T0 is 40 s into its minute: the minute began at T0 - 40
            call(1, usage={"input_tokens": 5, "output_tokens": 7}),
            call(2, outcome="budget_refused"),
            call(3, ts=T0 - 41),  # the minute before
            call(4, context={"customer_id": "bob"}),
        ]
    )
    store.close()
    book = _book(db)
    now = T0 + 5
    assert book.used(RateLimit("c", 10, customer="acme"), now) == 2
    assert book.used(RateLimit("c", 10), now) == 3
    assert book.used(RateLimit("t", 10, unit="tokens", customer="acme"), now) == 110 + 12
    book.limits.set(RateLimit("rpm", 3, customer="acme"))
    assert [r.name for r in book.limits.list()] == ["rpm"]
    assert book.limits.delete("rpm") and not book.limits.delete("rpm")
    book.close()
    assert main(["limits", "set", "--name", "rpm", "--calls-per-minute", "5", "--db", db]) == 0
    assert main(["limits", "list", "--db", db]) == 0
    assert "rpm: 5 calls per minute, every call" in capsys.readouterr().out


def test_budget_and_key_routes_answer_503_while_the_store_is_unreachable() -> None:
    """A PostgreSQL server that is away (L{StoreUnavailable} from the store
    thread): C{/api/budgets}, its grants and C{/api/keys} answer 503
    C{unavailable} (as C{/api/events} does), not a 500 with a traceback."""
    import io
    import json
    from typing import cast

    from twisted.internet.defer import fail
    from twisted.internet.task import Clock
    from twisted.web.test.requesthelper import DummyRequest

    from llmobserve.collector._auth import KeyVerifier
    from llmobserve.collector._budgetapi import BudgetsResource
    from llmobserve.collector._keyapi import KeysResource
    from llmobserve.collector._store import StoreUnavailable
    from llmobserve.collector._thread import StoreThread

    class AwayReader:
        def submit(self, job: Any) -> Any:
            return fail(StoreUnavailable("PostgreSQL unreachable: connection refused"))

    reader = cast(StoreThread, AwayReader())
    resources = [
        (BudgetsResource(reader), b"GET", [], b""),
        (BudgetsResource(reader), b"POST", [b"grants"], b'{"holder": "h", "reports": []}'),
        (KeysResource(reader, KeyVerifier(reader, Clock())), b"GET", [], b""),
    ]
    for resource, method, postpath, body in resources:
        request = DummyRequest(postpath)
        request.method = method
        request.content = io.BytesIO(body)  # type: ignore[attr-defined]  # DummyRequest has none; the resources read it
        resource.render(request)
        assert request.responseCode == 503, (resource, method)
        error = json.loads(b"".join(request.written))["error"]
        assert error["type"] == "unavailable"
