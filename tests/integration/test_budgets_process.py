"""Budgets in a real C{twistd -n llmobserve}, with the real openai and
anthropic clients: 402 with no retry, no overshoot under 64 concurrent
clients, a restart that keeps the spend, a budget set while it runs.

Budgets are set with the C{llmobserve budgets} command on the proxy's own
store file (its embedded mode), as the README says.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import (
    RecordedRequest,
    RecordingUpstream,
    Response,
    json_response,
    openai_sse_events,
)

from llmobserve.cli import main as cli
from llmobserve.collector import EventStore, SQLiteBudgetBook
from llmobserve.money import usd_fixed

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

PROMPT_TOKENS = 1000  # within the proxy's bound for a small body (bytes + 1000)


def _openai(req: RecordedRequest) -> Response:
    """A chat completion that used the whole output allowance: the worst case
    happens; streamed (20 ms a chunk), a small one with its usage chunk."""
    body = json.loads(req.body or b"{}")
    if body.get("stream"):
        sse = [("Content-Type", "text/event-stream")]
        return Response(200, sse, openai_sse_events(20), chunk_interval=0.02)
    out = int(body.get("max_tokens") or 10)
    return json_response(
        {
            "id": "chatcmpl-b",
            "object": "chat.completion",
            "created": 1700000000,
            "model": body.get("model", "gpt-4o-mini"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x"},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": out,
                "total_tokens": PROMPT_TOKENS + out,
            },
        }
    )


def _anthropic(req: RecordedRequest) -> Response:
    return json_response(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20241022",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 21, "output_tokens": 7},
        }
    )


@pytest.fixture
def upstreams() -> Iterator[tuple[RecordingUpstream, RecordingUpstream]]:
    with RecordingUpstream(_openai) as oa, RecordingUpstream(_anthropic) as an:
        yield oa, an


def _proxy(
    home: Path, oa: RecordingUpstream, an: RecordingUpstream, extra: list[str] | None = None
) -> ProxyProcess:
    args = [
        *(extra or []),
        *LOOPBACK_ARGS,
        "--provider-host",
        f"{oa.authority}=openai",
        "--provider-host",
        f"{an.authority}=anthropic",
        "--base-url",
        f"openai={oa.url}/v1",
        "--base-url",
        f"anthropic={an.url}",
    ]
    return ProxyProcess(args, workdir=home)


def _budget(db: Path, *args: str) -> None:
    assert cli(["budgets", "set", *args, "--db", str(db)]) == 0


def _events(db: Path) -> list[dict[str, Any]]:
    store = EventStore(db)
    try:
        return store.events(limit=None, kind="call")
    finally:
        store.close()


def _wait_events(db: Path, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if db.exists():
            found = _events(db)
            if len(found) >= n:
                return found
        time.sleep(0.05)
    raise AssertionError(f"{len(found)} of {n} events")


def test_402_through_the_real_clients_is_raised_once_and_never_retried(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """A spent budget: openai and anthropic (default retries on) each raise
    one APIStatusError with status 402; the upstreams saw nothing; each
    call is one budget_refused event."""
    import anthropic
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    db.parent.mkdir(parents=True)
    _budget(db, "--name", "zero", "--limit-usd", "0", "--window", "month")
    with _proxy(home, oa, an) as proxy:
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai")
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        err = raised.value
        assert err.status_code == 402
        assert err.response.headers["x-llmobserve-error"] == "budget_exceeded"
        assert isinstance(err.body, dict) and err.body["type"] == "budget_exceeded"
        assert err.body["budget"]["name"] == "zero"
        print("openai:", type(err).__name__, str(err)[:300])
        aclient = anthropic.Anthropic(api_key="sk-test", base_url=f"{proxy.url}/anthropic")
        with pytest.raises(anthropic.APIStatusError) as araised:
            aclient.messages.create(
                model="claude-3-5-sonnet-20241022",
                max_tokens=10,
                messages=[{"role": "user", "content": "hi"}],
            )
        assert araised.value.status_code == 402
        events = _wait_events(db, 2)
        assert [e["outcome"] for e in events] == ["budget_refused", "budget_refused"]
        assert [e["provider"] for e in events] == ["openai", "anthropic"]
    assert oa.requests == [] and an.requests == []


def _key(db: Path, name: str, project: str) -> str:
    out = io.StringIO()
    assert cli(["keys", "create", "--name", name, "--project", project, "--db", str(db)], out) == 0
    return out.getvalue().splitlines()[-1]


def test_a_project_budget_refuses_that_project_s_keys_only(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """A proxy that requires keys, a spent block budget with C{--project
    alpha}: calls made with alpha's key get the 402 and never reach the
    upstream; calls with beta's key go through (real openai client)."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    db.parent.mkdir(parents=True)
    alpha, beta = _key(db, "a-app", "alpha"), _key(db, "b-app", "beta")
    _budget(db, "--name", "alpha-cap", "--limit-usd", "0", "--window", "day", "--project", "alpha")
    with _proxy(home, oa, an, ["--require-keys"]) as proxy:

        def status(key: str) -> int:
            client = openai.OpenAI(
                api_key="sk-test",
                base_url=f"{proxy.url}/openai",
                default_headers={"X-LLMObserve-Key": key},
            )
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIStatusError as e:
                assert e.status_code == 402 and isinstance(e.body, dict)
                assert e.body["budget"]["name"] == "alpha-cap"
                return e.status_code
            return 200

        assert [status(alpha), status(beta), status(alpha), status(beta)] == [402, 200, 402, 200]
        events = _wait_events(db, 4)
    assert len(oa.requests) == 2
    assert sorted((e["project"], e["outcome"]) for e in events) == [
        ("alpha", "budget_refused"),
        ("alpha", "budget_refused"),
        ("beta", "ok"),
        ("beta", "ok"),
    ]


def test_64_concurrent_clients_never_overshoot_and_a_restart_keeps_the_spend(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """64 async openai clients, 3 calls each, every call worth (and really
    costing) about $0.01, against $1.00: recorded spend <= $1.00, every call
    either forwarded or refused with a 402 (and recorded so), every admitted
    call carried X-LLMObserve-Budget-Remaining. After a restart the spend
    is still there: the next call is refused."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    db.parent.mkdir(parents=True)
    _budget(db, "--name", "cap", "--limit-usd", "1.00", "--window", "day")
    calls = 64 * 3
    with _proxy(home, oa, an) as proxy:

        async def one(client: Any, results: list[Any]) -> None:
            for _ in range(3):
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini",
                        max_tokens=16_000,
                        messages=[{"role": "user", "content": "hi"}],
                    )
                    results.append(raw.headers.get("x-llmobserve-budget-remaining"))
                except openai.APIStatusError as e:
                    results.append(e.status_code)

        async def run() -> list[Any]:
            results: list[Any] = []
            async with openai.AsyncOpenAI(
                api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0
            ) as client:
                await asyncio.gather(*(one(client, results) for _ in range(64)))
            return results

        results = asyncio.run(run())
        refused = [r for r in results if r == 402]
        allowed = [r for r in results if r != 402]
        assert len(results) == calls and refused and allowed
        assert all(isinstance(r, str) and float(r) >= 0 for r in allowed)
        events = _wait_events(db, calls)
        spend = sum(e["cost_usd"] or 0 for e in events)
        assert spend <= 1.00
        assert spend > 0.95  # the budget was used, not refused early
        outcomes = [e["outcome"] for e in events]
        assert outcomes.count("budget_refused") == len(refused)
        assert outcomes.count("ok") == len(allowed) == len(oa.requests)
        print(f"admitted {len(allowed)}, refused {len(refused)}, spend ${spend:.6f}")
    with _proxy(home, oa, an) as proxy:
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=16_000, messages=[{"role": "user", "content": "hi"}]
            )
        assert raised.value.status_code == 402
        assert len(oa.requests) == len(allowed)


def test_a_budget_set_while_the_proxy_runs_applies_within_2s(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """No restart: once `budgets set` returns, calls are refused within 2 s;
    once `budgets delete` returns, they pass again within 2 s."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    with _proxy(home, oa, an) as proxy:
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

        def status() -> int:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIStatusError as e:
                return e.status_code
            return 200

        assert status() == 200
        _budget(
            db, "--name", "zero", "--limit-usd", "0", "--window", "hour", "--model", "gpt-4o-mini"
        )
        set_at = time.monotonic()
        while status() != 402:
            assert time.monotonic() - set_at < 2.0
            time.sleep(0.1)
        assert cli(["budgets", "delete", "zero", "--db", str(db)]) == 0
        deleted_at = time.monotonic()
        while status() != 200:
            assert time.monotonic() - deleted_at < 2.0
            time.sleep(0.1)


def test_budgets_through_a_collectors_api(tmp_path: Path, capsys: Any) -> None:
    """`budgets set|list|delete --collector URL` go through /api/budgets of a
    real collector (a `project` scope included); bad definitions are a 400 with the reason; `report
    --collector` ends with spend vs limit."""
    import io
    import urllib.error
    import urllib.request

    from support.proxy import CollectorProcess

    with CollectorProcess(workdir=tmp_path / "c") as collector:
        url = collector.url
        out = io.StringIO()
        args = ["--name", "acme", "--limit-usd", "2.5", "--window", "day", "--customer", "acme"]
        assert cli(["budgets", "set", *args, "--collector", url], out) == 0
        assert cli(["budgets", "list", "--format", "json", "--collector", url], out) == 0
        listed = json.loads(out.getvalue().split("\n", 1)[1])["budgets"]
        assert [(b["name"], b["limit_usd"], b["spend_usd"]) for b in listed] == [("acme", 2.5, 0.0)]
        out = io.StringIO()
        assert cli(["report", "--collector", url], out) == 0
        assert "acme: $0 of $2.5 (0%) this day" in out.getvalue()
        args = ["--name", "alpha", "--limit-usd", "1", "--window", "day", "--project", "alpha"]
        assert cli(["budgets", "set", *args, "--collector", url], out) == 0
        assert [b.project for b in SQLiteBudgetBook(collector.db).list()] == [None, "alpha"]
        assert cli(["budgets", "delete", "alpha", "--collector", url], out) == 0
        bad = urllib.request.Request(
            f"{url}/api/budgets",
            data=json.dumps({"name": "x", "limit_usd": 1, "window": "week"}).encode(),
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(bad, timeout=10)
        assert raised.value.code == 400
        assert "window must be one of" in json.loads(raised.value.read())["error"]["message"]
        assert cli(["budgets", "delete", "acme", "--collector", url], out) == 0
        assert cli(["budgets", "delete", "acme", "--collector", url], out) == 1
        assert "no budget named 'acme'" in capsys.readouterr().err
        assert SQLiteBudgetBook(collector.db).list() == []


def test_a_calls_per_minute_limit_through_the_real_client(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """`limits set --calls-per-minute 2` on a running proxy: within 2 s, the
    third call in a minute is a 429 (rate_limited, Retry-After) the openai
    client raises as RateLimitError; it never reaches the upstream."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    with _proxy(home, oa, an) as proxy:
        db_args = ["--db", str(db)]
        assert cli(["limits", "set", "--name", "rpm", "--calls-per-minute", "2", *db_args]) == 0
        time.sleep(2.0)  # the proxy reads limits every second
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)
        # the first minute may end between calls: try until two pass and one is refused
        deadline = time.monotonic() + 70
        while time.monotonic() < deadline:
            before = len(oa.requests)
            try:
                for _ in range(3):
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=10,
                        messages=[{"role": "user", "content": "hi"}],
                    )
            except openai.RateLimitError as e:
                assert e.response.headers["x-llmobserve-error"] == "rate_limited"
                assert 1 <= int(e.response.headers["retry-after"]) <= 60
                assert len(oa.requests) - before <= 2
                break
        else:
            raise AssertionError("no call was rate limited")


def test_a_streamed_call_settles_at_its_end_and_an_aborted_one_keeps_its_hold(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """$0.015 admits one call worth up to ~$0.0098 at a time. A stream read to
    its end settles to its small real cost, so the next call is admitted; a
    stream the client abandons before its usage chunk has no price (with
    estimates off: by default it would settle at its estimate), so its whole
    worst case stays spent and the next one is refused."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    db.parent.mkdir(parents=True)
    _budget(db, "--name", "cap", "--limit-usd", "0.015", "--window", "day")
    with _proxy(home, oa, an, ["--stream-usage", "openai=off"]) as proxy:
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

        def stream() -> Any:
            return client.chat.completions.create(
                model="gpt-4o-mini",
                max_tokens=16_000,
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hi"}],
            )

        assert len(list(stream())) > 20  # read to the end
        deadline = time.monotonic() + 5
        while True:  # the settle follows the parse pool, a few ms later
            try:
                second = stream()
                break
            except openai.APIStatusError as e:
                assert e.status_code == 402 and time.monotonic() < deadline
                time.sleep(0.05)
        next(iter(second))
        second.close()  # abandoned before the usage chunk
        deadline = time.monotonic() + 10
        aborted: list[dict[str, Any]] = []
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.05)
            aborted = [e for e in _events(db) if e["outcome"] == "client_aborted"]
        assert len(aborted) == 1 and aborted[0]["cost_usd"] is None
        with pytest.raises(openai.APIStatusError) as raised:
            stream()
        assert raised.value.status_code == 402
        assert "it is spent" in str(raised.value) or "could cost" in str(raised.value)


def test_unknown_prices_are_allowed_and_flagged_or_blocked_per_budget(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """A model with no price under a default budget passes, its event flagged
    budget_unpriced; once the budget says --unpriced block, it is a 402."""
    import openai

    oa, an = upstreams
    home = tmp_path / "p"
    db = home / "home" / "events.sqlite3"
    db.parent.mkdir(parents=True)
    _budget(db, "--name", "cap", "--limit-usd", "1", "--window", "day")
    with _proxy(home, oa, an) as proxy:
        client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

        def call() -> Any:
            return client.chat.completions.with_raw_response.create(
                model="house-model-7b", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )

        raw = call()
        assert raw.headers["x-llmobserve-budget-remaining"] == "1.000000"
        [event] = _wait_events(db, 1)
        assert "budget_unpriced" in event["flags"] and event["cost_usd"] is None
        _budget(db, "--name", "cap", "--limit-usd", "1", "--window", "day", "--unpriced", "block")
        deadline = time.monotonic() + 2.5
        while True:
            try:
                call()
            except openai.APIStatusError as e:
                assert e.status_code == 402 and "no price" in str(e)
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert len(oa.requests) >= 1


def test_two_proxies_sharing_one_store_never_overshoot(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Two proxy processes on one store file with --shared-budgets, 32
    concurrent clients on each, every call worth (and costing) about $0.01,
    against $1.00: the recorded spend of both stays <= $1.00 and both
    admitted calls (each spends the slices the store grants it)."""
    import openai

    oa, an = upstreams
    db = tmp_path / "shared.sqlite3"
    _budget(db, "--name", "cap", "--limit-usd", "1.00", "--window", "day")
    shared = ["--db", str(db), "--shared-budgets"]
    with _proxy(tmp_path / "a", oa, an, shared) as pa, _proxy(tmp_path / "b", oa, an, shared) as pb:

        async def one(client: Any, results: list[Any], which: str) -> None:
            for _ in range(3):
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=16_000,
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
                    *(one(ca, results, "a") for _ in range(32)),
                    *(one(cb, results, "b") for _ in range(32)),
                )
            return results

        results = asyncio.run(run())
        assert len(results) == 192
        assert results.count("a") > 0 and results.count("b") > 0
        admitted = results.count("a") + results.count("b")
        events = _wait_events(db, 192)
        spend = sum(e["cost_usd"] or 0 for e in events)
        print(f"two processes: admitted {admitted}, refused {192 - admitted}, spend ${spend:.6f}")
        assert spend <= 1.00
        assert len(oa.requests) == admitted


def test_proxies_on_one_collector_share_its_budgets_and_fail_closed(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Two proxies sending their events to one collector take slices of its
    budget (POST /api/budgets/grants): 64 clients against $1.00 record at most
    $1.00 in the collector's store. With the collector gone, a proxy spends
    only what it was granted, then refuses (fail closed)."""
    import openai
    from support.proxy import CollectorProcess

    oa, an = upstreams
    with CollectorProcess(workdir=tmp_path / "c") as collector:
        url = collector.url
        assert (
            cli(
                [
                    "budgets",
                    "set",
                    "--name",
                    "cap",
                    "--limit-usd",
                    "1.00",
                    "--window",
                    "day",
                    "--collector",
                    url,
                ]
            )
            == 0
        )
        link = ["--collector", url]
        with _proxy(tmp_path / "a", oa, an, link) as pa, _proxy(tmp_path / "b", oa, an, link) as pb:

            async def one(client: Any, results: list[Any]) -> None:
                for _ in range(3):
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o-mini",
                            max_tokens=16_000,
                            messages=[{"role": "user", "content": "hi"}],
                        )
                        results.append(200)
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
                        *(one(ca, results) for _ in range(32)),
                        *(one(cb, results) for _ in range(32)),
                    )
                return results

            results = asyncio.run(run())
            admitted = results.count(200)
            assert admitted > 0 and results.count(402) > 0
            events = _wait_events(Path(collector.db), 192)
            spend = sum(e["cost_usd"] or 0 for e in events)
            print(f"collector: admitted {admitted}, spend ${spend:.6f}")
            assert spend <= 1.00
            assert len(oa.requests) == admitted


def test_a_proxy_alone_on_a_collector_waits_for_a_grant_instead_of_refusing(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """A proxy holds a slice of a collector's budget (a quarter of the limit
    when alone). A burst of 16 concurrent calls worth about half the limit
    used to get 402 for every call past the slice (about 9 of them), though
    the budget had room: a call refused only by this process's share now
    waits for the grant exchange it asks for, and is checked again. The
    limit still holds: calls go on until it refuses them, and the recorded
    spend stays within it."""
    import openai
    from support.proxy import CollectorProcess

    oa, an = upstreams
    with CollectorProcess(workdir=tmp_path / "c") as collector:
        args = ["--name", "cap", "--limit-usd", "0.05", "--window", "total"]
        assert cli(["budgets", "set", *args, "--collector", collector.url]) == 0
        with _proxy(tmp_path / "a", oa, an, ["--collector", collector.url]) as proxy:

            async def one(client: Any) -> int:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=2000,  # about $0.0014 at worst, and used whole
                        messages=[{"role": "user", "content": "hi"}],
                    )
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            async def burst(n: int) -> list[int]:
                async with openai.AsyncOpenAI(
                    api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0
                ) as client:
                    return list(await asyncio.gather(*(one(client) for _ in range(n))))

            first = asyncio.run(burst(16))
            assert first == [200] * 16, first
            later = [asyncio.run(burst(1))[0] for _ in range(40)]
            assert 402 in later
            admitted = 16 + later.count(200)
            events = _wait_events(Path(collector.db), 16 + 40)
            spend = sum(e["cost_usd"] or 0 for e in events)
            print(f"alone on a collector: admitted {admitted}, spend ${spend:.6f} of $0.05")
            assert spend <= 0.05
            assert spend > 0.05 - 2 * 0.0014  # refused only when the limit had no room


def test_a_budget_already_spent_at_its_collector_says_so_in_the_402(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Three calls worth $0.00405 recorded, then a $0.003 budget set at the
    collector: the next call's 402 said "this process's spend $0 + in
    flight $0 of its share $0 ...; this process's share is spent", with
    spend_usd 0 (a new user's finding). It now gives the budget's spend as
    the collector sums it, and says the budget is spent."""
    import openai
    from support.proxy import CollectorProcess

    oa, an = upstreams
    with CollectorProcess(workdir=tmp_path / "c") as collector:
        with _proxy(tmp_path / "a", oa, an, ["--collector", collector.url]) as proxy:
            client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

            def call() -> Any:
                try:
                    return client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=2000,  # about $0.0014, used whole
                        messages=[{"role": "user", "content": "hi"}],
                    )
                except openai.APIStatusError as e:
                    return e

            assert all(not isinstance(call(), openai.APIStatusError) for _ in range(3))
            spend = sum(e["cost_usd"] for e in _wait_events(Path(collector.db), 3))
            args = ["--name", "cap", "--limit-usd", "0.003", "--window", "day"]
            assert cli(["budgets", "set", *args, "--collector", collector.url]) == 0
            time.sleep(2.5)  # a change applies within 2 s
            refused = call()
            client.close()
    assert isinstance(refused, openai.APIStatusError) and refused.status_code == 402
    body: Any = refused.body  # the 402's JSON
    detail = body["budget"]
    assert detail["spend_usd"] == pytest.approx(spend) and "share_usd" not in detail
    assert f"spend ${usd_fixed(round(spend, 8))} + in flight $0 of limit $0.003" in str(refused)
    assert str(refused).endswith("; it is spent")


def test_a_proxy_without_its_collector_spends_only_its_grant(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Fail closed: once the collector is gone, the proxy admits calls up to
    the slice it holds (a quarter of the limit when alone), then refuses."""
    import openai
    from support.proxy import CollectorProcess

    oa, an = upstreams
    collector = CollectorProcess(workdir=tmp_path / "c").start()
    try:
        assert (
            cli(
                [
                    "budgets",
                    "set",
                    "--name",
                    "cap",
                    "--limit-usd",
                    "1.00",
                    "--window",
                    "day",
                    "--collector",
                    collector.url,
                ]
            )
            == 0
        )
        with _proxy(tmp_path / "a", oa, an, ["--collector", collector.url]) as proxy:
            client = openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

            def status() -> int:
                try:
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        max_tokens=16_000,
                        messages=[{"role": "user", "content": "hi"}],
                    )
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            assert status() == 200
            collector.terminate()
            statuses = [status() for _ in range(60)]
            admitted = statuses.count(200)
            assert 0 < admitted <= 30 and statuses[-1] == 402
            print(f"outage: admitted {admitted} of 60 on the grant held")
    finally:
        collector.terminate()


def test_a_proxy_killed_in_an_outage_never_lets_the_budget_pass(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, RecordingUpstream]
) -> None:
    """Proxy A spends its slice of $1.00 (fail closed) while its collector is
    down, and is SIGKILLed before the collector is back: it never reports
    that spend. Its events reach the collector when A is started again on
    its spool (and stopped). Proxy B then spends all it is granted, for
    longer than the 30 s after which A counts as gone: the collector's
    recorded spend stays within $1.00 (until this version A's unreported
    slice went back to B then: $1.25 could be recorded)."""
    import openai
    from support.proxy import CollectorProcess

    oa, an = upstreams

    def status(client: Any) -> int:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini",
                max_tokens=16_000,
                messages=[{"role": "user", "content": "hi"}],
            )
        except openai.APIStatusError as e:
            return int(e.status_code)
        return 200

    def openai_client(proxy: ProxyProcess) -> Any:
        return openai.OpenAI(api_key="sk-test", base_url=f"{proxy.url}/openai", max_retries=0)

    collector = CollectorProcess(workdir=tmp_path / "c").start()
    port = collector.port
    proxies: list[ProxyProcess] = []
    try:
        url = collector.url
        assert cli(["budgets", "set", "--name", "cap", "--limit-usd", "1.00", "--window", "day",
                    "--collector", url]) == 0  # fmt: skip
        link = ["--collector", url]
        pa = _proxy(tmp_path / "a", oa, an, link).start()
        proxies.append(pa)
        client = openai_client(pa)
        assert status(client) == 200
        _wait_events(Path(collector.db), 1)
        collector.terminate()
        a_statuses = [status(client) for _ in range(60)]
        a_admitted = 1 + a_statuses.count(200)
        assert a_admitted > 1 and a_statuses[-1] == 402
        pa.kill()  # its spend never reported
        silent_since = time.monotonic()
        collector = CollectorProcess(
            workdir=tmp_path / "c", port=f"tcp:{port}:interface=127.0.0.1"
        ).start()
        with _proxy(tmp_path / "a", oa, an, link) as again:  # A's spool, delivered
            _wait_events(Path(collector.db), a_admitted)
        pb = _proxy(tmp_path / "b", oa, an, link).start()
        proxies.append(pb)
        client = openai_client(pb)
        b_admitted = 0
        refused_in_a_row = 0
        deadline = silent_since + 90
        # past the 30 s after which A counts as gone, until B is refused for 3 s
        while time.monotonic() < deadline and (
            time.monotonic() < silent_since + 35 or refused_in_a_row < 6
        ):
            if status(client) == 200:
                b_admitted += 1
                refused_in_a_row = 0
            else:
                refused_in_a_row += 1
                time.sleep(0.5)
        assert again.poll() is not None
        events = _wait_events(Path(collector.db), a_admitted + b_admitted)
        spend = sum(e["cost_usd"] or 0 for e in events)
        print(f"A admitted {a_admitted}, B admitted {b_admitted}, recorded ${spend:.6f} of $1.00")
        assert spend <= 1.00
        assert spend >= 0.90  # the room A did not hold was granted to B
    finally:
        for proxy in proxies:
            proxy.terminate()
        collector.terminate()
