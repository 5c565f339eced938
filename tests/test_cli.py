"""The llmobserve command: report (table/json/csv) and events (jsonl) against a store."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from llmobserve.cli import main
from llmobserve.collector import EventStore
from llmobserve.paths import default_db_path, default_home, default_spool_dir

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def event(i: int, **over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "id": f"ev{i}",
        "kind": "call",
        "ts": T0 + i * 3600,
        "provider": "openai",
        "model": "gpt-4o",
        "endpoint": "chat.completions",
        "outcome": "ok",
        "cost_usd": 0.25,
        "usage": {"input_tokens": 100, "output_tokens": 20},
        "context": {"customer_id": "acme", "run_id": "r1", "section": "plan"},
    }
    e.update(over)
    return e


EVENTS = [
    event(0),
    event(1, provider="anthropic", model="claude-3-5", cost_usd=1.5),
    event(2, cost_usd=None, context={"customer_id": "globex"}),
    event(3, model="gpt-4o-mini", cost_usd=0.01, surprise={"kept": True}),
    {"id": "span1", "kind": "span", "ts": T0, "name": "plan", "run_id": "r1"},
]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "events.sqlite3"
    store = EventStore(path)
    store.insert(EVENTS)
    store.close()
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_report_table_default(db: Path) -> None:
    """The default report is a table by provider and model with a total line."""
    code, text = run("report", "--db", str(db))
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["provider", "model", "calls"]
    assert lines[2].split()[:4] == ["anthropic", "claude-3-5", "1", "$1.50"]
    assert any(line.startswith("TOTAL") and "$1.76" in line for line in lines)
    assert "1 call(s) had no known price" in text


def test_estimated_spend_is_shown_apart(tmp_path: Path) -> None:
    """Cost priced from estimated usage is part of the total and said apart:
    a line under the table, estimated_cost_usd and estimated_calls in JSON."""
    path = tmp_path / "events.sqlite3"
    store = EventStore(path)
    store.insert(
        [
            event(0, usage_source="reported"),
            event(1, usage_source="estimated", cost_usd=0.125),
            event(2, usage_source="estimated", cost_usd=0.125, model="gpt-4o-mini"),
        ]
    )
    store.close()
    code, text = run("report", "--db", str(path))
    assert code == 0
    assert any(line.startswith("TOTAL") and "$0.5" in line for line in text.splitlines())
    assert "of the cost, $0.25 is estimated: 2 call(s)" in text
    code, text = run("report", "--db", str(path), "--format", "json", "--by", "model")
    rows = {r["model"]: r for r in json.loads(text)["rows"]}
    assert rows["gpt-4o"]["estimated_cost_usd"] == pytest.approx(0.125)
    assert rows["gpt-4o"]["estimated_calls"] == 1 and rows["gpt-4o"]["cost_usd"] == 0.375
    code, text = run("report", "--db", str(path), "--format", "json", "--by", "")
    [total] = json.loads(text)["rows"]
    assert total["estimated_cost_usd"] == pytest.approx(0.25)


def test_report_json(db: Path) -> None:
    """--format json gives by, window and rows with sums."""
    code, text = run("report", "--db", str(db), "--format", "json", "--by", "customer")
    assert code == 0
    doc = json.loads(text)
    assert doc["by"] == ["customer"]
    rows = {r["customer"]: r for r in doc["rows"]}
    assert rows["acme"]["calls"] == 3
    assert rows["acme"]["cost_usd"] == pytest.approx(1.76)
    assert rows["globex"]["cost_usd"] is None
    assert rows["globex"]["unpriced_calls"] == 1
    assert rows["acme"]["input_tokens"] == 300


def test_report_prints_refused_calls_on_their_own_line(tmp_path: Path) -> None:
    """Calls the proxy answered itself are not counted as calls of provider C{unknown}:
    the table leaves them out and says so on a line of its own (issue 14, item 12)."""
    path = tmp_path / "events.sqlite3"
    store = EventStore(path)
    store.insert(
        [
            event(0),
            event(1, outcome="refused", status=403, provider="unknown", model=None, cost_usd=None),
            event(2, outcome="refused", status=403, provider="unknown", model=None, cost_usd=None),
            event(3, outcome="proxy_error", status=502, provider="unknown", model=None),
        ]
    )
    store.close()
    code, text = run("report", "--db", str(path))
    assert code == 0
    assert "unknown" not in text and "no known price" not in text
    assert text.splitlines()[-1] == (
        "refused: 3 calls not forwarded (refused 2, proxy_error 1), not counted above"
    )
    code, text = run("report", "--db", str(path), "--format", "json")
    assert json.loads(text)["refused"] == {"refused": 2, "proxy_error": 1, "budget_refused": 0}
    assert [r["calls"] for r in json.loads(text)["rows"]] == [1]
    # asked for as rows, they are not "calls with no known price": they cost nothing
    code, text = run("report", "--db", str(path), "--outcome", "refused")
    assert code == 0 and "no known price" not in text
    assert text.splitlines()[-1] == "refused: the proxy answered these itself, they cost nothing."
    calls, cost, _, _, unpriced = text.splitlines()[2].split()[-5:]
    assert (calls, cost, unpriced) == ("2", "$0", "0")


def test_report_csv(db: Path) -> None:
    """--format csv has a header and one line per group."""
    code, text = run("report", "--db", str(db), "--format", "csv", "--by", "provider,model")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["provider"], r["model"]) for r in rows] == [
        ("anthropic", "claude-3-5"),
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
    ]
    assert rows[1]["calls"] == "2" and rows[1]["unpriced_calls"] == "1"
    assert rows[1]["cost_usd"] == "0.25"


def test_report_since_until_and_filters(db: Path) -> None:
    """--since/--until take ISO or unix times; filters narrow the report."""
    code, text = run(
        "report", "--db", str(db), "--format", "json", "--by", "", "--since", "2025-06-15T16:00Z"
    )
    assert json.loads(text)["rows"][0]["calls"] == 3
    code, text = run(
        "report", "--db", str(db), "--format", "json", "--by", "", "--until", str(T0 + 1)
    )
    assert json.loads(text)["rows"][0]["calls"] == 1
    code, text = run("report", "--db", str(db), "--format", "json", "--provider", "anthropic")
    assert [r["provider"] for r in json.loads(text)["rows"]] == ["anthropic"]
    code, text = run("report", "--db", str(db), "--since", "24h")
    assert code == 0 and "no calls in this window" in text
    code, text = run("report", "--db", str(db), "--customer", "nobody")
    assert code == 0 and "no calls match these filters" in text
    EventStore(db.parent / "empty.sqlite3").close()
    code, text = run("report", "--db", str(db.parent / "empty.sqlite3"))
    assert code == 0 and "no calls recorded yet" in text


def test_report_by_day_in_time_order(db: Path) -> None:
    """Grouping by day lists days in order."""
    code, text = run("report", "--db", str(db), "--format", "json", "--by", "day")
    assert [r["day"] for r in json.loads(text)["rows"]] == ["2025-06-15"]
    code, text = run("report", "--db", str(db), "--format", "json", "--by", "hour")
    assert code == 0
    hours = [r["hour"] for r in json.loads(text)["rows"]]
    assert hours == sorted(hours) and len(hours) == 4


def test_events_jsonl(db: Path) -> None:
    """events --format jsonl prints one event per line with DESIGN.md names."""
    code, text = run("events", "--db", str(db), "--format", "jsonl")
    assert code == 0
    lines = [json.loads(line) for line in text.splitlines()]
    assert [e["id"] for e in lines] == ["ev0", "span1", "ev1", "ev2", "ev3"]
    ev0 = lines[0]
    for field in ("ts", "provider", "model", "usage", "cost_usd", "context", "outcome"):
        assert field in ev0
    assert lines[3]["cost_usd"] is None
    assert lines[4]["surprise"] == {"kept": True}


def test_events_filters_and_limit(db: Path) -> None:
    """events honours filters, --kind, --limit and --offset."""

    def ids(*extra: str) -> list[str]:
        code, text = run("events", "--db", str(db), *extra)
        assert code == 0
        return [json.loads(line)["id"] for line in text.splitlines()]

    assert ids("--kind", "span") == ["span1"]
    assert ids("--customer", "globex") == ["ev2"]
    assert ids("--run", "r1") == ["ev0", "span1", "ev1", "ev3"]
    assert ids("--model", "gpt-4o-mini") == ["ev3"]
    assert ids("--limit", "2") == ["ev0", "span1"]
    assert ids("--limit", "2", "--offset", "3") == ["ev2", "ev3"]
    assert ids("--since", str(T0 + 3600)) == ["ev1", "ev2", "ev3"]


def test_events_paging_over_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export larger than one page comes out whole, in order."""
    import llmobserve.cli as cli

    monkeypatch.setattr(cli, "_PAGE", 7)
    path = tmp_path / "x.sqlite3"
    store = EventStore(path)
    store.insert([event(i) for i in range(30)])
    store.close()
    code, text = run("events", "--db", str(path))
    assert [json.loads(line)["id"] for line in text.splitlines()] == [f"ev{i}" for i in range(30)]
    code, text = run("events", "--db", str(path), "--limit", "15")
    assert code == 0
    assert len(text.splitlines()) == 15


def test_events_json_and_csv(db: Path) -> None:
    """events also writes a JSON array or CSV."""
    code, text = run("events", "--db", str(db), "--format", "json", "--kind", "call")
    assert [e["id"] for e in json.loads(text)] == ["ev0", "ev1", "ev2", "ev3"]
    code, text = run("events", "--db", str(db), "--format", "csv", "--kind", "call")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["id"] == "ev0"
    assert json.loads(rows[0]["usage"]) == {"input_tokens": 100, "output_tokens": 20}


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--by", "colour"],
        ["report", "--since", "last tuesday"],
        ["events", "--limit", "-1"],
    ],
)
def test_bad_arguments_fail_cleanly(db: Path, argv: list[str]) -> None:
    """Bad values give exit status 1 and a message, no traceback."""
    code, _ = run(*argv, "--db", str(db))
    assert code == 1


def test_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing store file is a clear error, and is not created."""
    path = tmp_path / "nope" / "events.sqlite3"
    code, _ = run("report", "--db", str(path))
    assert code == 1
    assert "no event store" in capsys.readouterr().err
    assert not path.parent.exists()


@pytest.mark.parametrize(
    "action",
    [
        ("keys", "list"),
        ("keys", "revoke", "admin"),
        ("budgets", "list"),
        ("budgets", "delete", "cap"),
        ("limits", "list"),
        ("limits", "delete", "rpm"),
    ],
)
def test_an_action_that_reads_or_removes_refuses_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: tuple[str, ...]
) -> None:
    """`budgets list --db` on a mistyped path made a store there and said
    "no budgets defined", exit 0 (a new user's finding): every action but
    create and set refuses a store file that is not there, as report does."""
    path = tmp_path / "typo.sqlite3"
    code, text = run(*action, "--db", str(path))
    assert (code, text) == (1, "")
    assert f"no event store at {path}" in capsys.readouterr().err
    assert not path.exists()


def test_create_and_set_make_the_store_they_name(tmp_path: Path) -> None:
    """The first key, budget or limit may come before anything has run."""
    for i, action in enumerate(
        [
            ("keys", "create", "--name", "admin", "--scope", "admin"),
            ("budgets", "set", "--name", "cap", "--limit-usd", "5", "--window", "day"),
            ("limits", "set", "--name", "rpm", "--calls-per-minute", "60"),
        ]
    ):
        path = tmp_path / f"new{i}.sqlite3"
        assert run(*action, "--db", str(path))[0] == 0
        assert path.exists()


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default store is $LLMOBSERVE_HOME/events.sqlite3, home ~/.llmobserve."""
    monkeypatch.delenv("LLMOBSERVE_HOME", raising=False)
    assert default_home() == Path.home() / ".llmobserve"
    monkeypatch.setenv("LLMOBSERVE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "events.sqlite3"
    assert default_spool_dir() == tmp_path / "spool"
    store = EventStore(default_db_path())
    store.insert(EVENTS)
    store.close()
    code, text = run("events", "--kind", "span")  # no --db: the default store
    assert code == 0 and json.loads(text)["id"] == "span1"


class _FakeCollector(BaseHTTPRequestHandler):
    """Answers /api/report and /api/events from a store, as the collector does."""

    store_path: Path

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        store = EventStore(self.store_path)
        try:
            since = float(q.pop("since")) if "since" in q else None
            until = float(q.pop("until")) if "until" in q else None
            if url.path == "/api/report":
                by = [b for b in q.pop("by", "").split(",") if b]
                body: Any = {"rows": store.report(by, since=since, until=until, **q)}
            else:
                limit = int(q.pop("limit"))
                offset = int(q.pop("offset"))
                filters: dict[str, Any] = q  # the query's filters, by name
                body = {"events": store.events(since, until, limit, offset, **filters)}
        finally:
            store.close()
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_collector(db: Path) -> Iterator[str]:
    handler = type("H", (_FakeCollector,), {"store_path": db})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_against_collector_url(fake_collector: str) -> None:
    """--collector URL reads the same answers over the HTTP API."""
    code, text = run("report", "--collector", fake_collector, "--format", "json", "--by", "model")
    assert code == 0
    assert {r["model"] for r in json.loads(text)["rows"]} == {"gpt-4o", "claude-3-5", "gpt-4o-mini"}
    code, text = run("events", "--collector", fake_collector, "--kind", "call", "--limit", "3")
    assert [json.loads(line)["id"] for line in text.splitlines()] == ["ev0", "ev1", "ev2"]


def test_unreachable_collector(capsys: pytest.CaptureFixture[str]) -> None:
    """A collector that is not there is a clear error."""
    code, _ = run("report", "--collector", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the collector" in capsys.readouterr().err


def test_help_documents_everything() -> None:
    """--help on the command and each subcommand names every option."""
    out = subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", "--help"], capture_output=True, text=True
    ).stdout
    for word in ("report", "events", "--db", "--collector", "LLMOBSERVE_HOME", "24h"):
        assert word in out
    out = subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", "report", "--help"],
        capture_output=True,
        text=True,
    ).stdout
    for word in ("--by", "--format", "--since", "--until", "--customer", "--section-path"):
        assert word in out


def test_cli_does_not_import_twisted() -> None:
    """Importing the command line does not import Twisted (fast start-up)."""
    code = "import sys, llmobserve.cli; sys.exit('twisted' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_csv_money_is_in_fixed_notation(tmp_path: Path) -> None:
    """Issue 14 item 14: a small cost is 0.0000072 in CSV, never 7.2e-06, in the
    report and in the events export alike."""
    path = tmp_path / "events.sqlite3"
    store = EventStore(path)
    store.insert([event(0, cost_usd=7.2e-06), event(1, cost_usd=0.000108, model="m2")])
    store.close()
    _code, text = run("report", "--db", str(path), "--format", "csv", "--by", "model")
    costs = {r["model"]: r["cost_usd"] for r in csv.DictReader(io.StringIO(text))}
    assert costs == {"gpt-4o": "0.0000072", "m2": "0.000108"}
    _code, text = run("events", "--db", str(path), "--format", "csv")
    listed = [r["cost_usd"] for r in csv.DictReader(io.StringIO(text))]
    assert sorted(listed) == ["0.0000072", "0.000108"]
    _code, text = run("report", "--db", str(path), "--by", "model")
    assert "$0.0000072" in text and "e-" not in text


def test_keys_budgets_and_limits_default_to_llmobserve_db(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With $LLMOBSERVE_DB exported (COLLECTOR.md's walkthrough), report read that
    store but keys, budgets and limits wrote the proxy's default file, and `keys
    list` said "no keys" although its --help names $LLMOBSERVE_DB."""
    monkeypatch.setenv("LLMOBSERVE_HOME", str(tmp_path / "home"))
    shared = tmp_path / "shared.sqlite3"
    monkeypatch.setenv("LLMOBSERVE_DB", str(shared))
    assert run("keys", "create", "--name", "admin", "--scope", "admin")[0] == 0
    assert run("budgets", "set", "--name", "cap", "--limit-usd", "5", "--window", "day")[0] == 0
    assert run("limits", "set", "--name", "rpm", "--calls-per-minute", "60")[0] == 0
    assert not (tmp_path / "home" / "events.sqlite3").exists()
    monkeypatch.delenv("LLMOBSERVE_DB")
    assert "admin" in run("keys", "list", "--db", str(shared))[1]
    assert run("budgets", "list", "--db", str(shared))[1].startswith("cap: ")
    assert run("limits", "list", "--db", str(shared))[1].startswith("rpm: ")


class _BudgetsAPI(BaseHTTPRequestHandler):
    """/api/budgets that remembers the Authorization header of each request."""

    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        data = b'{"limits": []}' if self.path.startswith("/api/limits") else b'{"budgets": []}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_budgets_and_limits_take_key_and_ca_file_after_the_action(tmp_path: Path) -> None:
    """`budgets list --collector URL --key KEY` (as `keys list` is written) was
    "unrecognized arguments: --key": --key and --ca-file were taken only before
    the action, although --db and --collector were taken after it too."""
    seen: list[str | None] = []
    handler = type("H", (_BudgetsAPI,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, text = run("budgets", "list", "--collector", url, "--key", "llmo_k1")
        assert (code, text) == (0, "no budgets defined\n")
        code, _ = run("budgets", "--key", "llmo_k2", "list", "--collector", url)
        assert code == 0
        code, text = run("limits", "list", "--collector", url, "--key", "llmo_k3")
        assert (code, text) == (0, "no limits defined\n")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer llmo_k1", "Bearer llmo_k2", "Bearer llmo_k3"]


@pytest.mark.parametrize(
    "action",
    [
        ("budgets", "set", "--name", "b", "--limit-usd", "5", "--window", "day"),
        ("limits", "set", "--name", "l", "--calls-per-minute", "60"),
    ],
)
def test_a_scope_on_an_unknown_provider_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: tuple[str, ...]
) -> None:
    """`budgets set --provider opneai` was stored and never matched a call:
    an id the registry does not know is a usage error naming the closest."""
    db = str(tmp_path / "events.sqlite3")
    with pytest.raises(SystemExit) as exited:
        run(*action, "--provider", "opneai", "--db", db)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --provider: unknown provider 'opneai'; did you mean 'openai'?" in err
    assert run(*action, "--provider", "openai", "--db", db)[0] == 0


@pytest.mark.parametrize("command", ["budgets", "limits"])
@pytest.mark.parametrize("action", ["set", "list", "delete"])
def test_each_action_s_help_names_where_it_reads_and_writes(
    capsys: pytest.CaptureFixture[str], command: str, action: str
) -> None:
    """`budgets set --help` left out --db, --collector, --key and --ca-file,
    although the action takes them (a new user's finding)."""
    with pytest.raises(SystemExit):
        run(command, action, "--help")
    shown = capsys.readouterr().out
    for option in ("--db PATH|URL", "--collector URL", "--key KEY", "--ca-file PEM"):
        assert option in shown, option


@pytest.mark.parametrize(
    ("action", "said"),
    [
        (
            ("budgets", "set", "--name", "b", "--limit-usd", "-1", "--window", "day"),
            "llmobserve budgets set: error: limit_usd must not be negative",
        ),
        (
            ("budgets", "set", "--name", "b", "--limit-usd", "1", "--window", "day"),
            "llmobserve budgets set: error: unknown time zone 'Mars/Base'",
        ),
        (
            ("limits", "set", "--name", "l", "--calls-per-minute", "-5"),
            "llmobserve limits set: error: per_minute must not be negative",
        ),
    ],
)
def test_a_value_the_definition_refuses_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: tuple[str, ...], said: str
) -> None:
    """`--limit-usd -1` and `--tz Mars/Base` exited 1 where `--window week`
    exits 2 (a new user's finding): a value the definition refuses is a
    usage error too, said as argparse says its own, and no store is made."""
    path = tmp_path / "events.sqlite3"
    extra = ("--tz", "Mars/Base") if "time zone" in said else ()
    code, text = run(*action, *extra, "--db", str(path))
    assert (code, text) == (2, "")
    err = capsys.readouterr().err
    assert err.splitlines()[0] == said
    assert not path.exists()
