"""Keys and budgets shared by two real collectors on one store, and keys
through a PostgreSQL outage.

Collectors on one store (docs/COLLECTOR.md, "PostgreSQL and several
collectors": one PostgreSQL database, or one SQLite file on one machine;
the C{shared_db} fixture runs each test on both) share what they keep
there: a key made through one collector is valid at the other, a
revocation through either applies to both within the verdict caches'
bound, and budget grants handed out by either never sum past the budget
(an advisory lock per budget on PostgreSQL, SQLite's write lock on a
file; tests/support/postgres.py starts the server). While the PostgreSQL
server is away a key cannot be checked: a new link is refused and its
events wait, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from integration.test_budgets_process import _openai
from support.clients import chat_request, raw_request
from support.commands import llmobserve, new_key
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.stores import StoreUnreadable, row
from support.upstreams import RecordingUpstream

pytestmark = [pytest.mark.timeout(180)]


def _json(url: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _call(proxy: ProxyProcess, upstream: RecordingUpstream, key: str) -> int:
    request = chat_request(proxy.port, upstream.url)
    head, sep, rest = request.partition(b"\r\n")
    request = head + sep + b"X-LLMObserve-Key: " + key.encode() + b"\r\n" + rest
    status: int = raw_request(proxy.port, request).status
    return status


def test_a_key_made_through_one_collector_is_valid_at_the_other(
    tmp_path: Path, shared_db: str
) -> None:
    """Two collectors with --require-keys on one store. The first admin
    key is made with C{keys create --db STORE}; the proxy's link
    key and a client key are made through collector A's API. A proxy that
    requires client keys, linked to collector B, admits the client key and
    its event lands in the database with the key's project; revoked through
    A, the client key is refused at B's proxy within seconds."""
    admin = new_key("--name", "admin", "--scope", "admin", "--db", shared_db)
    a = CollectorProcess(["--require-keys"], db=shared_db, workdir=tmp_path / "a")
    b = CollectorProcess(["--require-keys"], db=shared_db, workdir=tmp_path / "b")
    with RecordingUpstream() as upstream, a, b:
        via_a = ("--collector", a.url, "--key", admin)
        link = new_key("--name", "proxy", "--scope", "admin", *via_a)
        shop = new_key("--name", "shop-app", "--project", "shop", *via_a)
        listed = llmobserve("keys", "list", "--collector", b.url, "--key", admin)
        assert listed.returncode == 0 and "shop-app" in listed.stdout, listed.stderr
        args = [
            *LOOPBACK_ARGS,
            "--require-keys",
            "--provider-host",
            f"127.0.0.1:{upstream.port}=openai",
            "--collector",
            b.url,
            "--collector-key",
            link,
        ]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            assert _call(proxy, upstream, "llmo_" + "w" * 43) == 401
            assert _call(proxy, upstream, shop) == 200
            _wait_for(
                lambda: _json(b.url + "/health")["events_stored"] == 1,
                20,
                "the event at collector B",
            )
            rows = _json(a.url + "/api/report?by=project", admin)["rows"]
            assert [(r["project"], r["calls"]) for r in rows] == [("shop", 1)]
            revoked = llmobserve("keys", "revoke", "shop-app", *via_a)
            assert revoked.returncode == 0, revoked.stderr
            # B's verdict cache (2 s) and the proxy's own: a few seconds at most
            since = time.monotonic()
            admitted: list[int] = []

            def refused() -> bool:
                status = _call(proxy, upstream, shop)
                admitted.extend([status] if status == 200 else [])
                time.sleep(0.2)
                return status == 401

            _wait_for(refused, 15, "the revocation at B")
            print(f"revoked through A, refused at B's proxy after {time.monotonic() - since:.1f} s")
    assert len(upstream.requests) == 1 + len(admitted)


def _two_collectors_on_a_capped_store(
    tmp_path: Path, db: str
) -> tuple[CollectorProcess, CollectorProcess]:
    """A $1.00 day budget C{cap} set in C{db}, and two collectors on it (not started)."""
    budget = ["--name", "cap", "--limit-usd", "1.00", "--window", "day", "--db", db]
    assert llmobserve("budgets", "set", *budget).returncode == 0
    return (
        CollectorProcess(db=db, workdir=tmp_path / "a"),
        CollectorProcess(db=db, workdir=tmp_path / "b"),
    )


def _spend(db: str) -> tuple[int, float]:
    """(call events, their recorded cost) in the store."""
    calls, cost = row(
        db, "SELECT count(*), COALESCE(sum(cost_usd), 0) FROM events WHERE kind = 'call'"
    )
    return int(calls), float(cost)


def test_proxies_on_two_collectors_never_overshoot_one_budget(
    tmp_path: Path, shared_db: str
) -> None:
    """Two collectors on one store, a proxy linked to each (each polls
    its own collector for grants of the same $1.00 block budget), 64
    concurrent clients through each proxy making two calls of about $0.01:
    the spend recorded in the store stays <= $1.00, both proxies admitted
    calls, and each collector's all-time /api/summary (read from its
    rollup) counts every call either stored."""
    import openai

    calls = 2 * 2 * 64
    a, b = _two_collectors_on_a_capped_store(tmp_path, shared_db)
    with RecordingUpstream(_openai) as oa, a, b:

        def proxy(collector: CollectorProcess, name: str) -> ProxyProcess:
            args = [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"{oa.authority}=openai",
                "--base-url",
                f"openai={oa.url}/v1",
                "--collector",
                collector.url,
            ]
            return ProxyProcess(args, workdir=tmp_path / name)

        with proxy(a, "pa") as pa, proxy(b, "pb") as pb:

            async def one(client: Any, results: list[Any], which: str) -> None:
                for _ in range(2):
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o-mini",
                            max_tokens=16_000,  # with 1,000 prompt tokens: $0.00975
                            messages=[{"role": "user", "content": "hi"}],
                        )
                        results.append(which)
                    except openai.APIStatusError as e:
                        results.append(e.status_code)

            async def run() -> list[Any]:
                results: list[Any] = []
                async with (
                    openai.AsyncOpenAI(
                        api_key="sk-test", base_url=f"{pa.url}/openai", max_retries=0
                    ) as ca,
                    openai.AsyncOpenAI(
                        api_key="sk-test", base_url=f"{pb.url}/openai", max_retries=0
                    ) as cb,
                ):
                    await asyncio.gather(
                        *(one(ca, results, "a") for _ in range(64)),
                        *(one(cb, results, "b") for _ in range(64)),
                    )
                return results

            results = asyncio.run(run())
            assert len(results) == calls
            admitted = results.count("a") + results.count("b")
            assert results.count("a") > 0 and results.count("b") > 0
            assert set(results) <= {"a", "b", 402}
            _wait_for(lambda: _spend(shared_db)[0] >= calls, 60, "every event in the store")
            stored, spend = _spend(shared_db)
            kind = "postgresql" if "://" in shared_db else "sqlite"
            print(
                f"two collectors on one {kind} store: admitted {admitted} of {calls} "
                f"(a {results.count('a')}, b {results.count('b')}), spend ${spend:.6f} of $1.00"
            )
            assert stored == calls
            assert spend <= 1.00
            assert len(oa.requests) == admitted
            status = _json(a.url + "/api/budgets")["budgets"]
            assert [(s["name"], s["spend_usd"]) for s in status] == [("cap", pytest.approx(spend))]
            for collector in (a, b):  # each one's rollup counts the other's rows too
                summary = _json(collector.url + "/api/summary")
                assert summary["calls"] + summary["refused_calls"] == stored, summary
                assert summary["cost_usd"] == pytest.approx(spend)


def test_a_server_restart_with_keys_required_loses_nothing(
    tmp_path: Path, postgres_server: Any
) -> None:
    """A collector with --require-keys on PostgreSQL and a proxy linked with
    an ingest key; the server stopped mid-ingest and the proxy restarted
    meanwhile: its new link's key cannot be checked, so the link is refused
    ("the key store could not be read") and its events wait in the spool;
    once the server is back the link is welcomed and every call is stored
    once, under the key's project."""
    from support.postgres import PostgresServer

    calls = 300
    server = PostgresServer(postgres_server.bindir).init().start()
    try:
        url = server.url()
        key = new_key("--name", "proxy", "--project", "team-a", "--db", url)
        collector = CollectorProcess(["--require-keys"], db=url, workdir=tmp_path / "c")
        with RecordingUpstream() as upstream, collector:
            args = [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--collector",
                collector.url,
                "--collector-key",
                key,
            ]
            with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
                request = chat_request(proxy.port, upstream.url)
                for _ in range(calls // 2):
                    assert raw_request(proxy.port, request).status == 200
                _wait_for(lambda: _stored(url) == calls // 2, 30, "the first half stored")
                server.stop()
                request = chat_request(proxy.port, upstream.url)
                for _ in range(calls // 2):
                    assert raw_request(proxy.port, request).status == 200
            # a new link meanwhile (the proxy restarted): its key cannot be checked
            with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
                _wait_for(
                    lambda: _json(proxy.url + "/health")["collector"]["refused"] is not None,
                    20,
                    "the link refused while the key store is away",
                )
                assert "the key store could not be read" in proxy.log_text()
                server.start()
                _wait_for(lambda: _stored(url) >= calls, 90, "every call stored")
                _wait_for(
                    lambda: _json(proxy.url + "/health")["events_waiting"] == 0,
                    30,
                    "the proxy's spool to drain",
                )
                assert _json(proxy.url + "/health")["collector"]["refused"] is None
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT count(*), count(DISTINCT id), count(*) FILTER"
                " (WHERE extra::jsonb ->> 'project' = 'team-a') FROM events WHERE kind = 'call'"
            ).fetchone()
        assert rows == (calls, calls, calls)
    finally:
        server.destroy()


def _stored(url: str) -> int:
    try:
        return _spend(url)[0]
    except StoreUnreadable:
        return -1


def test_budgets_follow_the_link_to_the_next_collector(tmp_path: Path, shared_db: str) -> None:
    """A proxy with two --collector URLs on one store, a $1.00 block budget
    and the first collector stopped: the link failed over to the second, but
    the budgets were still read from the first, so the proxy spent the slice
    it held (a quarter of the limit, about 25 calls of ~$0.01) and then
    answered 402 to every call. Its budget poller moves to the second
    collector too: after the slice it held, calls are admitted again, and
    the log says it reads from the second now."""
    import openai

    a, b = _two_collectors_on_a_capped_store(tmp_path, shared_db)
    with RecordingUpstream(_openai) as oa, a, b:
        args = [
            *LOOPBACK_ARGS,
            "--provider-host",
            f"{oa.authority}=openai",
            "--base-url",
            f"openai={oa.url}/v1",
            "--collector",
            a.url,
            "--collector",
            b.url,
        ]
        with ProxyProcess(args, workdir=tmp_path / "p") as proxy:
            client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

            def call() -> int:
                try:
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=16_000,  # with 1,000 prompt tokens: $0.00975
                        messages=[{"role": "user", "content": "hi"}],
                    )
                    return 200
                except openai.APIStatusError as e:
                    return e.status_code

            assert call() == 200  # the budget is known and a slice is held
            log = proxy.log_text()
            assert f"budgets shared with other processes on {a.url}, {b.url}:" in log
            a.terminate()
            _wait_for(lambda: "budgets: collector" in proxy.log_text(), 30, "the poller to miss A")
            statuses = [call() for _ in range(40)]
            # a few calls may be refused while the first read from the second
            # collector is under way (a top-up is a round trip); then calls are
            # admitted again (the slice alone held about 25 of them)
            _wait_for(lambda: call() == 200, 30, "a call admitted on the second's grant")
            assert [call() for _ in range(5)] == [200] * 5, statuses
            # the log says where budgets come from now (a new user saw only
            # "unreachable", then nothing, although the next collector answered)
            assert f"budgets: now reading from collector {b.url} after" in proxy.log_text()
            client.close()
            _wait_for(lambda: _spend(shared_db)[0] >= 47, 60, "every event in the store")
            assert _spend(shared_db)[1] <= 1.00
