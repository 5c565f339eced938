"""API keys on a real collector and real proxies (DESIGN.md, "A shared deployment").

A collector started with C{--require-keys} (what listening beyond loopback
implies) admits a proxy's link only with an C{ingest} key in its hello, and
C{/api/*} only with C{Authorization: Bearer} and a C{read} key, whose
project scopes what it reads. Keys are made with C{llmobserve keys create}
(C{--db} on the collector's machine for the first admin key, then
C{--collector URL} with it). A refused link loses nothing: the events wait
in the proxy's spool and arrive once the key is right; a revoked key stops
working within seconds; no key is ever written to a log, the spool, the
store or an export.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.clients import chat_calls, chat_request, raw_request
from support.commands import llmobserve
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordingUpstream

CALLS = 5


def _new_key(*args: str) -> str:
    """C{llmobserve keys create ARGS}: the key, alone on the last line."""
    done = llmobserve("keys", "create", *args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[-1]
    assert key.startswith("llmo_") and " " not in key, done.stdout
    assert done.stdout.count(key) == 1
    return key


def _get(url: str, key: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _json(url: str, key: str | None = None) -> Any:
    status, _, body = _get(url, key)
    assert status == 200, body
    return body


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _collector(tmp_path: Path) -> CollectorProcess:
    return CollectorProcess(
        ["--require-keys"], db=tmp_path / "collector.db", workdir=tmp_path / "collector"
    )


def _proxy(
    tmp_path: Path, upstream: RecordingUpstream, collector: CollectorProcess, *args: str, name: str
) -> ProxyProcess:
    return ProxyProcess(
        [
            *LOOPBACK_ARGS,
            "--provider-host",
            f"127.0.0.1:{upstream.port}=openai",
            "--collector",
            collector.url,
            *args,
        ],
        workdir=tmp_path / name,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["missing", "wrong", "revoked", "read-scope"])
def test_a_link_without_a_good_key_keeps_its_events_until_the_key_is_fixed(
    tmp_path: Path, fault: str
) -> None:
    """A link with no key, an unknown key, a revoked key or a read key is
    refused: calls still answer 200, nothing is stored, the proxy's /health
    says C{refused: unauthorized} and every event waits in its spool; the
    proxy restarted with an ingest key delivers each of them once, marked
    with the key's project."""
    db = tmp_path / "collector.db"
    good = _new_key("--name", "proxy-a", "--project", "team-a", "--db", str(db))
    bad = {
        "missing": None,
        "wrong": "llmo_" + "x" * 43,
        "revoked": _new_key("--name", "old", "--db", str(db)),
        "read-scope": _new_key("--name", "reader", "--scope", "read", "--db", str(db)),
    }[fault]
    if fault == "revoked":
        assert llmobserve("keys", "revoke", "old", "--db", str(db)).returncode == 0
    with RecordingUpstream() as upstream, _collector(tmp_path) as collector:
        args = ("--collector-key", bad) if bad else ()
        with _proxy(tmp_path, upstream, collector, *args, name="proxy") as proxy:
            chat_calls(proxy.port, upstream.url, CALLS)
            _wait_for(
                lambda: _json(proxy.url + "/health")["collector"]["refused"] == "unauthorized",
                10,
                "the refusal in the proxy's /health",
            )
            _wait_for(
                lambda: _json(proxy.url + "/health")["events_waiting"] == CALLS,
                10,
                "the events in the spool",
            )
            time.sleep(0.5)  # another link attempt
            health = _json(proxy.url + "/health")
            assert health["collector"]["state"] != "connected"
            assert health["collector"]["refused"] == "unauthorized"
            assert health["events_waiting"] == CALLS
            # a monitor reading only the status sees it: the events will not
            # be stored until the key is fixed
            assert health["status"] == "degraded"
            assert any("--collector-key" in reason for reason in health["degraded"])
            if fault != "read-scope":  # its budgets' reads are refused too (a read
                # key may read them): said as such, not "unreachable"
                _wait_for(
                    lambda: "refuses this proxy's key (HTTP 401" in proxy.log_text(),
                    10,
                    "the budget reads' refusal in the log",
                )
        assert _json(collector.url + "/health")["events_stored"] == 0
        assert "unauthorized" in collector.log_text()
        assert "; keys required (links: an ingest key;" in collector.log_text()
        with _proxy(tmp_path, upstream, collector, "--collector-key", good, name="proxy") as proxy:
            _wait_for(
                lambda: _json(proxy.url + "/health")["events_waiting"] == 0,
                20,
                "the spool to drain",
            )
            assert _json(proxy.url + "/health")["collector"]["refused"] is None
            assert _json(proxy.url + "/health")["status"] == "ok"
        admin = _new_key("--name", "admin", "--scope", "admin", "--db", str(db))
        events = _json(collector.url + "/api/events?limit=100", admin)["events"]
    assert len({e["id"] for e in events}) == len(events) == CALLS
    assert {e["project"] for e in events} == {"team-a"}


@pytest.mark.timeout(120)
def test_reads_need_a_key_and_a_read_key_sees_its_own_project(tmp_path: Path) -> None:
    """Two proxies (two projects) report to one collector. C{/api/*} answers
    401 C{unauthorized} (error contract) without a key or with a wrong one;
    a read key of team-a sees team-a's events and report rows only, even
    when it asks for team-b's; an admin key sees both; a read key may not
    manage keys (403), an admin key may, over C{--collector}."""
    db = tmp_path / "collector.db"
    key_a = _new_key("--name", "proxy-a", "--project", "team-a", "--db", str(db))
    key_b = _new_key("--name", "proxy-b", "--project", "team-b", "--db", str(db))
    admin = _new_key("--name", "admin", "--scope", "admin", "--db", str(db))
    with RecordingUpstream() as upstream, _collector(tmp_path) as collector:
        url = collector.url
        with (
            _proxy(tmp_path, upstream, collector, "--collector-key", key_a, name="a") as a,
            _proxy(tmp_path, upstream, collector, "--collector-key", key_b, name="b") as b,
        ):
            chat_calls(a.port, upstream.url, CALLS)
            chat_calls(b.port, upstream.url, 2 * CALLS)
            _wait_for(
                lambda: _json(url + "/health")["events_stored"] == 3 * CALLS,
                20,
                "the events at the collector",
            )
        for key in (None, "llmo_" + "y" * 43, "not-a-key"):
            paths = ["/api/events", "/api/report", "/api/keys"]
            paths += ["/dashboard"] if key else []  # no key at all: a redirect to the login
            for path in paths:
                status, headers, body = _get(url + path, key)
                assert status == 401, (path, body)
                assert headers["X-LLMObserve-Error"] == "unauthorized"
                assert body["error"]["type"] == "unauthorized"
        reader = llmobserve(
            "keys", "create", "--name", "reader-a", "--project", "team-a", "--scope", "read",
            "--collector", url, "--key", admin,
        )  # fmt: skip
        assert reader.returncode == 0, reader.stderr
        read_a = reader.stdout.splitlines()[-1]
        events = _json(url + "/api/events?project=team-b&limit=100", read_a)["events"]
        assert len(events) == CALLS and {e["project"] for e in events} == {"team-a"}
        rows = _json(url + "/api/report?by=project", read_a)["rows"]
        assert [(r["project"], r["calls"]) for r in rows] == [("team-a", CALLS)]
        rows = _json(url + "/api/report?by=project", admin)["rows"]
        assert sorted((r["project"], r["calls"]) for r in rows) == [
            ("team-a", CALLS),
            ("team-b", 2 * CALLS),
        ]
        status, headers, body = _get(url + "/api/keys", read_a)
        assert status == 403 and headers["X-LLMObserve-Error"] == "forbidden", body
        report = llmobserve("report", "--by", "project", "--format", "json", "--collector", url,
                      "--key", read_a)  # fmt: skip
        assert report.returncode == 0, report.stderr
        assert [r["project"] for r in json.loads(report.stdout)["rows"]] == ["team-a"]
        listed = llmobserve("keys", "list", "--collector", url, "--key", admin)
        assert listed.returncode == 0, listed.stderr
        assert "reader-a" in listed.stdout and "llmo_" not in listed.stdout
        refused = llmobserve("report", "--collector", url)
        assert refused.returncode == 1 and "API key is required" in refused.stderr
        revoked = llmobserve("keys", "revoke", "reader-a", "--collector", url, "--key", admin)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        assert _get(url + "/api/events", read_a)[0] == 401  # at once: the cache is dropped


@pytest.mark.timeout(120)
def test_a_revoked_key_stops_working_within_seconds(tmp_path: Path) -> None:
    """Revoked with C{keys revoke --db} while the collector runs (its cache
    is not told): a read key gets 401 within a few seconds, and a proxy's
    open link is closed at its next batch, its events kept in the spool."""
    db = tmp_path / "collector.db"
    ingest = _new_key("--name", "proxy", "--db", str(db))
    read = _new_key("--name", "reader", "--scope", "read", "--db", str(db))
    with RecordingUpstream() as upstream, _collector(tmp_path) as collector:
        with _proxy(tmp_path, upstream, collector, "--collector-key", ingest, name="p") as proxy:
            chat_calls(proxy.port, upstream.url, CALLS)
            _wait_for(
                lambda: _json(collector.url + "/health")["events_stored"] == CALLS,
                20,
                "the first events",
            )
            assert _get(collector.url + "/api/events", read)[0] == 200
            for target in ("reader", ingest):  # by name, and by the key itself
                done = llmobserve("keys", "revoke", target, "--db", str(db))
                assert done.returncode == 0, done.stderr
                assert "llmo_" not in done.stdout + done.stderr
            _wait_for(
                lambda: _get(collector.url + "/api/events", read)[0] == 401,
                10,
                "the revoked read key refused",
            )

            def refused() -> bool:
                chat_calls(proxy.port, upstream.url, 1)
                return bool(_json(proxy.url + "/health")["collector"]["refused"] == "unauthorized")

            _wait_for(refused, 15, "the revoked link closed")
            time.sleep(0.5)
            stored = _json(collector.url + "/health")["events_stored"]
            chat_calls(proxy.port, upstream.url, 2)
            time.sleep(1.0)
            assert _json(collector.url + "/health")["events_stored"] == stored
            assert _json(proxy.url + "/health")["events_waiting"] >= 2


@pytest.mark.timeout(120)
def test_keys_never_reach_logs_spool_store_or_exports(tmp_path: Path) -> None:
    """Links, calls (X-LLMObserve-Key) and reads made with keys (right,
    wrong and revoked) leave no key in the proxy's or the collector's log,
    the spool, the store file, the upstream's requests or C{llmobserve
    events --format jsonl}."""
    db = tmp_path / "collector.db"
    ingest = _new_key("--name", "proxy", "--project", "p", "--db", str(db))
    admin = _new_key("--name", "admin", "--scope", "admin", "--db", str(db))
    revoked = _new_key("--name", "gone", "--scope", "read", "--db", str(db))
    assert llmobserve("keys", "revoke", revoked, "--db", str(db)).returncode == 0
    wrong = "llmo_" + "z" * 43
    with RecordingUpstream() as upstream, _collector(tmp_path) as collector:
        with _proxy(tmp_path, upstream, collector, "--collector-key", wrong, name="p") as proxy:
            chat_calls(proxy.port, upstream.url, CALLS)
            _wait_for(
                lambda: _json(proxy.url + "/health")["collector"]["refused"] == "unauthorized",
                10,
                "the refusal",
            )
        client = "X-LLMObserve-Key: " + ingest
        with _proxy(
            tmp_path, upstream, collector, "--collector-key", ingest, "--require-keys", name="p"
        ) as proxy:
            # the proxy's clients send keys too: the right one, a wrong and a revoked one
            for header in (client, "X-LLMObserve-Key: " + wrong, "X-LLMObserve-Key: " + revoked):
                for _ in range(CALLS if header == client else 1):
                    head, sep, rest = chat_request(proxy.port, upstream.url).partition(b"\r\n")
                    request = head + sep + header.encode() + b"\r\n" + rest
                    status = raw_request(proxy.port, request).status
                    assert status == (200 if header == client else 401)
            _wait_for(lambda: _json(proxy.url + "/health")["events_waiting"] == 0, 20, "delivery")
        for key in (revoked, wrong, admin):
            _get(collector.url + "/api/report", key)
        export = llmobserve(
            "events", "--format", "jsonl", "--collector", collector.url, "--key", admin
        )
        assert export.returncode == 0, export.stderr
        assert len(export.stdout.splitlines()) == 2 * CALLS
        logs = [collector.log_text(), proxy.log_text()]
        logs += [repr(r.headers) for r in upstream.requests]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("spool" in str(p) for p in files)
    blobs = [p.read_bytes() for p in files] + [t.encode() for t in [*logs, export.stdout]]
    for key in (ingest, admin, revoked, wrong):
        secret = key.encode()
        assert not any(secret in blob for blob in blobs)
