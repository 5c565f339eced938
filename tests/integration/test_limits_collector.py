"""Rate limits through a collector, in real processes: C{llmobserve limits
--collector} over C{/api/limits} (keys as for budgets, on a SQLite and a
PostgreSQL store), two proxies on one collector sharing a calls-per-minute
limit through granted slices, and a proxy without its collector using only
its slice (fail closed)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from pathlib import Path
from typing import Any

import pytest
from integration.test_budgets_process import _proxy, upstreams
from support.proxy import CollectorProcess
from support.upstreams import RecordingUpstream

from llmobserve.cli import main as cli
from llmobserve.collector import open_store

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

__all__ = ["upstreams"]  # the fixture, imported for these tests


def _early_in_a_minute(needed: float) -> None:
    """Wait, if need be, until C{needed} seconds are left in the UTC minute,
    so that a test's calls all fall in one minute."""
    left = 60.0 - time.time() % 60.0
    if left < needed:
        time.sleep(left + 0.5)


def _key(db: str, name: str, scope: str) -> str:
    out = io.StringIO()
    assert cli(["keys", "create", "--name", name, "--scope", scope, "--db", db], out) == 0
    return out.getvalue().splitlines()[-1]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_limits_through_a_collectors_api(
    tmp_path: Path, capsys: Any, backend: str, request: pytest.FixtureRequest
) -> None:
    """`limits set|list|delete --collector URL` go through /api/limits of a
    real collector that requires keys: set and delete need an admin key, a
    proxy's link key (ingest) may list; the definition lands in the
    collector's store, whichever its back end."""
    db = str(tmp_path / "collector.db")
    if backend == "postgres":
        db = request.getfixturevalue("pg_url")
    admin = _key(db, "admin", "admin")
    link = _key(db, "link", "ingest")
    with CollectorProcess(["--require-keys"], db=db, workdir=tmp_path / "c") as collector:
        at = ["--collector", collector.url]
        out = io.StringIO()
        rpm = ["--name", "rpm", "--calls-per-minute", "5", "--customer", "acme"]
        assert cli(["limits", "--key", link, "set", *rpm, *at], out) == 1
        assert "admin" in capsys.readouterr().err
        assert cli(["limits", "--key", admin, "set", *rpm, *at], out) == 0
        tpm = ["--name", "tpm", "--tokens-per-minute", "900", "--fail", "open"]
        assert cli(["limits", "--key", admin, "set", *tpm, *at], out) == 0
        out = io.StringIO()
        assert cli(["limits", "--key", link, "list", *at], out) == 0
        assert out.getvalue().splitlines() == [
            "rpm: 5 calls per minute, customer=acme",
            "tpm: 900 tokens per minute, every call, fail open",
        ]
        assert cli(["limits", "--key", admin, "delete", "tpm", *at], out) == 0
        assert cli(["limits", "--key", admin, "delete", "tpm", *at], out) == 1
        assert "no limit named 'tpm'" in capsys.readouterr().err
    store = open_store(db)
    try:
        book = store.budget_book()
        assert [(r.name, r.per_minute, r.customer) for r in book.limits.list()] == [
            ("rpm", 5, "acme")
        ]
        book.close()
    finally:
        store.close()


def _calls(urls: list[str], per_proxy: int) -> list[int]:
    """C{per_proxy} concurrent chat calls through each proxy; their statuses."""
    import openai

    async def one(client: Any) -> int:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.APIStatusError as e:
            assert e.response.headers["x-llmobserve-error"] == "rate_limited"
            return e.status_code
        return 200

    async def run() -> list[int]:
        clients = [
            openai.AsyncOpenAI(api_key="sk-test", base_url=f"{url}/openai", max_retries=0)
            for url in urls
        ]
        try:
            return list(await asyncio.gather(*(one(c) for c in clients for _ in range(per_proxy))))
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(run())


@pytest.mark.parametrize("ledger", ["collector", "store-file"])
def test_two_proxies_share_a_calls_per_minute_limit(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream], ledger: str
) -> None:
    """A limit of N calls per minute, set while two proxies run on one
    collector (or on one store file with --shared-budgets), applies to both
    within 2 s; 2N + 4 concurrent calls through both in one minute: at most
    N reach the upstream (the proxies' slices never sum past N: overshoot
    0), the rest get 429 rate_limited."""
    n = 10
    oa, an = upstreams
    with contextlib.ExitStack() as stack:
        if ledger == "collector":
            collector = stack.enter_context(CollectorProcess(workdir=tmp_path / "c"))
            link = ["--collector", collector.url]
            where = ["--collector", collector.url]
        else:
            db = tmp_path / "shared.sqlite3"
            link = ["--db", str(db), "--shared-budgets"]
            where = ["--db", str(db)]
        pa = stack.enter_context(_proxy(tmp_path / "a", oa, an, link))
        pb = stack.enter_context(_proxy(tmp_path / "b", oa, an, link))
        _early_in_a_minute(20.0)
        assert cli(["limits", "set", "--name", "rpm", "--calls-per-minute", str(n), *where]) == 0
        time.sleep(2.0)  # the proxies read the limits every second
        statuses = _calls([pa.url, pb.url], n + 2)
        admitted = statuses.count(200)
        print(f"two proxies on a {ledger}, {n} calls per minute: {admitted} of 24 admitted")
        assert 0 < admitted <= n
        assert statuses.count(429) == len(statuses) - admitted
        assert len(oa.requests) == admitted


def test_a_proxy_without_its_collector_uses_only_its_slice(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Fail closed: once the collector is gone, the proxy admits calls up to
    the slice of the minute it holds (a quarter of the limit when alone),
    then answers 429."""
    import openai

    oa, an = upstreams
    collector = CollectorProcess(workdir=tmp_path / "c").start()
    try:
        limit = ["--name", "rpm", "--calls-per-minute", "40"]
        assert cli(["limits", "set", *limit, "--collector", collector.url]) == 0
        with _proxy(tmp_path / "a", oa, an, ["--collector", collector.url]) as proxy:
            client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

            def status() -> int:
                try:
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=10,
                        messages=[{"role": "user", "content": "hi"}],
                    )
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            _early_in_a_minute(20.0)
            deadline = time.monotonic() + 10
            while status() != 200:  # its first slice
                assert time.monotonic() < deadline
                time.sleep(0.2)
            collector.terminate()
            statuses = [status() for _ in range(30)]
            admitted = statuses.count(200)
            print(f"outage: admitted {admitted} of 30 on the slice held")
            assert admitted <= 10 and statuses[-1] == 429
    finally:
        collector.terminate()
