"""Real clients, through the SDK, through a real C{twistd -n llmobserve}, into the store.

Fake upstreams on 127.0.0.1 speak each API's wire format (OpenAI chat and
SSE, Anthropic messages and SSE, Pinecone query/upsert); the proxy is told
which provider each one is (C{--provider-host}) and stores events in its
embedded SQLite store. Each test calls as a distinct customer inside a
section and then checks the event that reached the store (provider, model,
tokens, cost, customer, section path) and that the application saw exactly
what the upstream sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import (
    DEFAULT_RESPONSE,
    RecordedRequest,
    RecordingUpstream,
    Response,
    anthropic_sse_events,
    json_response,
    openai_sse_events,
)

import llmobserve
from llmobserve.collector._store import EventStore

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ANTHROPIC_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-sonnet-20241022",
    "content": [{"type": "text", "text": "Hi there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 21, "output_tokens": 7},
}
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


#: A batch of 200 embeddings: 2 MB of JSON, longer than the 1.25 MiB the
#: proxy keeps for parsing; its usage is at the end.
EMBEDDINGS = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": i, "embedding": [0.0123456789] * 768} for i in range(200)
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 1600, "total_tokens": 1600},
}


def _openai(req: RecordedRequest) -> Response:
    if req.path.endswith("/embeddings"):
        return json_response(EMBEDDINGS)
    body = json.loads(req.body or b"{}")
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # "slow-end": each piece, the terminating chunk too, 150 ms after the last.
        interval = 0.15 if body.get("model") == "slow-end" else 0.005
        return Response(
            200, SSE, openai_sse_events(4, include_usage=usage), chunk_interval=interval
        )
    return DEFAULT_RESPONSE


def _anthropic(req: RecordedRequest) -> Response:
    if json.loads(req.body or b"{}").get("stream"):
        return Response(200, SSE, anthropic_sse_events(3), chunk_interval=0.005)
    return json_response(ANTHROPIC_MESSAGE)


def _pinecone(req: RecordedRequest) -> Response:
    if req.path.endswith("/query"):
        return json_response(
            {"matches": [{"id": "a", "score": 0.9}], "namespace": "ns", "usage": {"readUnits": 5}}
        )
    return json_response({"upsertedCount": 2})


class World:
    """The module's proxy and fake upstreams."""

    def __init__(
        self,
        proxy: ProxyProcess,
        openai: RecordingUpstream,
        anthropic: RecordingUpstream,
        pinecone: RecordingUpstream,
    ) -> None:
        self.proxy = proxy
        self.openai = openai
        self.anthropic = anthropic
        self.pinecone = pinecone
        self.hosts = {
            openai.authority: "openai",
            anthropic.authority: "anthropic",
            pinecone.authority: "pinecone",
        }

    def events(self, customer: str, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait for C{n} call events of C{customer} in the proxy's embedded store."""
        db = self.proxy.home / "events.sqlite3"
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if db.exists():
                store = EventStore(db)
                try:
                    found = store.events(limit=None, customer=customer, kind="call")
                finally:
                    close = getattr(store, "close", None)
                    if close:
                        close()
                if len(found) >= n:
                    return found
            time.sleep(0.05)
        raise AssertionError(
            f"{len(found)} of {n} events for {customer}:\n{self.proxy.log_tail(20)}"
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with (
        RecordingUpstream(_openai) as oa,
        RecordingUpstream(_anthropic) as an,
        RecordingUpstream(_pinecone) as pc,
    ):
        args = [*LOOPBACK_ARGS]
        for server, provider in ((oa, "openai"), (an, "anthropic"), (pc, "pinecone")):
            args += ["--provider-host", f"{server.authority}={provider}"]
        args += ["--base-url", f"openai={oa.url}"]  # base-URL mode: /openai/... goes there
        with ProxyProcess(args) as proxy:
            yield World(proxy, oa, an, pc)


@pytest.fixture
def tracked(world: World) -> World:
    llmobserve.observe(proxy_url=world.proxy.url, provider_hosts=world.hosts)
    return world


def _check(
    event: dict[str, Any],
    *,
    provider: str,
    model: str,
    customer: str,
    section_path: str,
    usage: dict[str, int],
    streamed: bool = False,
) -> None:
    assert event["provider"] == provider
    assert event["model"] == model
    assert event["outcome"] == "ok" and event["status"] == 200
    for key, value in usage.items():
        assert event["usage"].get(key) == value, (key, event["usage"])
    assert event["cost_usd"] is not None and event["cost_usd"] > 0
    assert event["context"]["customer_id"] == customer
    assert event["context"]["section_path"] == section_path
    assert event["streamed"] is streamed


# -- OpenAI ----------------------------------------------------------------------------


def _openai_client(world: World) -> Any:
    """The real C{openai.OpenAI} client, on the fake upstream, no retries."""
    import openai

    return openai.OpenAI(api_key="sk-test", base_url=f"{world.openai.url}/v1", max_retries=0)


def test_openai_sync(tracked: World) -> None:
    client = _openai_client(tracked)
    with llmobserve.customer("oa-sync"), llmobserve.section("agent:researcher"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert raw.http_response.content == DEFAULT_RESPONSE.body  # exactly what upstream sent
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens == 9
    [event] = tracked.events("oa-sync")
    _check(
        event,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        customer="oa-sync",
        section_path="agent:researcher",
        usage={"input_tokens": 9, "output_tokens": 3},
    )
    # The upstream got no llmobserve header, and the app's key.
    req = tracked.openai.requests[-1]
    assert req.header("Authorization") == b"Bearer sk-test"
    assert not any(n.lower().startswith(b"x-llmobserve") for n, _ in req.headers)


def test_openai_in_base_url_mode_keeps_the_context(tracked: World) -> None:
    """A client already pointed at the proxy (base-URL mode, C{/openai/v1}) is not
    rerouted, but the SDK adds its context headers: customer and section reach the
    event (issue 14, item 3: they were lost, C{context} was C{{}})."""
    import openai

    client = openai.OpenAI(
        api_key="sk-test", base_url=f"{tracked.proxy.url}/openai/v1", max_retries=0
    )
    with llmobserve.customer("acme"), llmobserve.section("agent:baseurl"):
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.usage is not None and completion.usage.prompt_tokens == 9
    [event] = tracked.events("acme")
    _check(
        event,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        customer="acme",
        section_path="agent:baseurl",
        usage={"input_tokens": 9, "output_tokens": 3},
    )
    assert event["context"]["span_id"] and event["context"]["run_id"]
    req = tracked.openai.requests[-1]
    assert req.path == "/v1/chat/completions"
    assert not any(n.lower().startswith(b"x-llmobserve") for n, _ in req.headers)


def test_openai_embeddings_batch_longer_than_the_parse_copy(tracked: World) -> None:
    """The proxy keeps the head and the tail of a long response for parsing:
    the usage at the end of a 2 MB embeddings batch is still found and
    priced, and the application gets every byte."""
    client = _openai_client(tracked)
    with llmobserve.customer("oa-embed"), llmobserve.section("index"):
        raw = client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["x"] * 200, encoding_format="float"
        )
    assert len(raw.http_response.content) == len(json_response(EMBEDDINGS).body) > 1_900_000
    assert len(raw.parse().data) == 200
    [event] = tracked.events("oa-embed")
    _check(
        event,
        provider="openai",
        model="text-embedding-3-small",
        customer="oa-embed",
        section_path="index",
        usage={"input_tokens": 1600},
    )
    assert "parse_truncated" in event["flags"] and "usage_from_cut_body" in event["flags"]
    assert event.get("parse_error") is None


def test_openai_async(tracked: World) -> None:
    import openai

    async def main() -> str | None:
        async with openai.AsyncOpenAI(
            api_key="sk-test", base_url=f"{tracked.openai.url}/v1", max_retries=0
        ) as client:
            with llmobserve.customer("oa-async"):
                async with llmobserve.section("planner"):
                    r = await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                    )
            return r.choices[0].message.content

    assert asyncio.run(main()) == "Hello!"
    [event] = tracked.events("oa-async")
    _check(
        event,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        customer="oa-async",
        section_path="planner",
        usage={"input_tokens": 9, "output_tokens": 3},
    )


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_openai_streaming(tracked: World, include_usage: bool) -> None:
    """A streamed completion stays streamed: chunks arrive one by one, byte-identical."""
    client = _openai_client(tracked)
    customer = f"oa-stream-{include_usage}"
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    with llmobserve.customer(customer), llmobserve.section("writer"):
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            **extra,
        ) as response:
            raw = b"".join(response.iter_bytes())
    assert raw == b"".join(openai_sse_events(4, include_usage=include_usage))
    [event] = tracked.events(customer)
    assert event["streamed"] is True
    assert event["provider"] == "openai" and event["model"] == "gpt-4o-mini-2024-07-18"
    assert event["context"]["section_path"] == "writer"
    # Without include_usage the proxy asks for it (--stream-usage openai=inject,
    # the default) and hides the usage chunk: the client saw the stream above.
    _check(
        event,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        customer=customer,
        section_path="writer",
        usage={"input_tokens": 11, "output_tokens": 4},
        streamed=True,
    )
    assert event["usage_source"] == "reported"


# -- Anthropic -------------------------------------------------------------------------


def test_a_fully_read_stream_is_ok_when_the_client_closes_first(tracked: World) -> None:
    """Issue 14, item 11: the sync openai client stops at C{[DONE]} and closes the
    connection; the upstream's terminating chunk comes 150 ms later, after the close
    has reached the proxy. The client had the whole response: C{ok}, not
    C{client_aborted}, with the usage and all the bytes."""
    client = _openai_client(tracked)
    with llmobserve.customer("oa-stream-closed"):
        stream = client.chat.completions.create(
            model="slow-end",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    [event] = tracked.events("oa-stream-closed")
    assert (event["outcome"], event["status"]) == ("ok", 200), event["flags"]
    assert event["response_bytes"] == len(b"".join(openai_sse_events(4, include_usage=True)))
    assert event["usage"]["output_tokens"] == 4


def test_anthropic_messages(tracked: World) -> None:
    import anthropic

    client = anthropic.Anthropic(
        api_key="sk-ant-test", base_url=tracked.anthropic.url, max_retries=0
    )
    with llmobserve.customer("an-msg"), llmobserve.section("agent:critic"):
        raw = client.messages.with_raw_response.create(
            model="claude-3-5-sonnet-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert json.loads(raw.http_response.content) == ANTHROPIC_MESSAGE
    [event] = tracked.events("an-msg")
    _check(
        event,
        provider="anthropic",
        model="claude-3-5-sonnet-20241022",
        customer="an-msg",
        section_path="agent:critic",
        usage={"input_tokens": 21, "output_tokens": 7},
    )


def test_anthropic_streaming(tracked: World) -> None:
    import anthropic

    client = anthropic.Anthropic(
        api_key="sk-ant-test", base_url=tracked.anthropic.url, max_retries=0
    )
    with llmobserve.customer("an-stream"), llmobserve.section("agent:critic"):
        with client.messages.stream(
            model="claude-3-5-sonnet-latest",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            text = "".join(stream.text_stream)
    assert text.startswith("tok0")
    [event] = tracked.events("an-stream")
    assert event["streamed"] is True
    assert event["provider"] == "anthropic"
    assert event["usage"].get("input_tokens") == 25
    assert event["cost_usd"] is not None and event["cost_usd"] > 0
    assert event["context"]["section_path"] == "agent:critic"


# -- Pinecone --------------------------------------------------------------------------


def test_pinecone_query_and_upsert(tracked: World) -> None:
    from pinecone import Pinecone

    index = Pinecone(api_key="pc-test").Index(host=tracked.pinecone.url)
    with llmobserve.customer("pc"), llmobserve.section("retrieval"):
        result = index.query(vector=[0.1, 0.2], top_k=1, namespace="ns")
        upserted = index.upsert(vectors=[("a", [0.1, 0.2]), ("b", [0.3, 0.4])], namespace="ns")
    assert result.matches[0].id == "a"
    assert upserted.upserted_count == 2
    query, upsert = tracked.events("pc", n=2)
    assert query["provider"] == upsert["provider"] == "pinecone"
    assert query["endpoint"] == "query" and query["usage"].get("read_units") == 5
    assert upsert["endpoint"] == "upsert"
    assert query["context"]["section_path"] == "retrieval"
    assert query["context"]["customer_id"] == "pc"


# -- plain HTTP libraries --------------------------------------------------------------

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})


def _plain_call(lib: str, url: str) -> tuple[int, bytes]:
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    if lib in ("httpx", "httpx2"):
        mod: Any = __import__(lib)
        r = mod.post(url, content=CHAT, headers=headers)
        return r.status_code, r.content
    if lib == "requests":
        import requests

        r2 = requests.post(url, data=CHAT, headers=headers)
        return r2.status_code, r2.content
    if lib == "urllib3":
        import urllib3

        r3 = urllib3.request("POST", url, body=CHAT, headers=headers)
        return r3.status, r3.data
    if lib == "urllib":
        import urllib.request

        request = urllib.request.Request(url, data=CHAT.encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=20) as r5:
            return r5.status, r5.read()
    import aiohttp

    async def main() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.post(url, data=CHAT, headers=headers) as r4:
            return r4.status, await r4.read()

    return asyncio.run(main())


@pytest.mark.parametrize("lib", ["httpx", "httpx2", "requests", "urllib3", "urllib", "aiohttp"])
def test_plain_http_libraries(tracked: World, lib: str) -> None:
    customer = f"plain-{lib}"
    with llmobserve.customer(customer), llmobserve.section(f"lib:{lib}"):
        status, body = _plain_call(lib, f"{tracked.openai.url}/v1/chat/completions")
    assert status == 200 and body == DEFAULT_RESPONSE.body
    [event] = tracked.events(customer)
    _check(
        event,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        customer=customer,
        section_path=f"lib:{lib}",
        usage={"input_tokens": 9, "output_tokens": 3},
    )


def test_sections_reach_the_store_as_spans(tracked: World) -> None:
    """A section's span travels the proxy's event path into the same store."""
    import httpx

    with llmobserve.customer("spans"), llmobserve.section("outer"):
        with llmobserve.section("inner"):
            httpx.post(f"{tracked.openai.url}/v1/chat/completions", content=CHAT)
    llmobserve.shutdown()  # flush spans now
    db = tracked.proxy.home / "events.sqlite3"
    deadline = time.monotonic() + 10
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(spans) < 2:
        spans = EventStore(db).events(limit=None, customer="spans", kind="span")
        time.sleep(0.05)
    assert sorted(s["context"]["section_path"] for s in spans) == ["outer", "outer/inner"]
    [call] = tracked.events("spans")
    inner = next(s for s in spans if s["context"]["section_path"] == "outer/inner")
    assert call["context"]["parent_span_id"] == inner["context"]["span_id"]


def test_policy_refusal_by_real_proxy_goes_direct(
    tracked: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A host the SDK routes (named in provider_hosts) but the proxy does not admit
    (::1 is outside its --allow-cidr 127.0.0.1/32): the real proxy answers 403 with
    X-LLMObserve-Error, the SDK sends the same call direct and remembers the host,
    and says once, with the proxy's reason, that those calls are not tracked."""
    import httpx

    from llmobserve.sdk._routing import ROUTER

    try:
        internal_server = RecordingUpstream(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with internal_server as internal:
        llmobserve.observe(
            proxy_url=tracked.proxy.url,
            provider_hosts={**tracked.hosts, internal.authority: "openai"},
        )
        url = f"{internal.url}/v1/chat/completions"
        port = int(internal.authority.rsplit(":", 1)[1])
        assert ROUTER.route("http", "::1", port)
        with llmobserve.customer("refused"), caplog.at_level("WARNING", logger="llmobserve"):
            r1 = httpx.post(url, content=CHAT)
            r2 = httpx.post(url, content=b"two")
        said = [r.getMessage() for r in caplog.records if "NOT tracked" in r.getMessage()]
        assert len(said) == 1, said
        assert f"calls to http://[::1]:{port} are NOT tracked" in said[0]
        assert "(not_allowed: " in said[0]
        assert r1.status_code == 200 and r2.status_code == 200
        reqs = internal.wait_requests(2)
    assert [r.body for r in reqs] == [CHAT.encode(), b"two"]
    # Both came direct: no proxy Via, none of our headers.
    assert not any(r.header("Via") for r in reqs)
    assert not any(n.lower().startswith(b"x-llmobserve") for r in reqs for n, _ in r.headers)
    assert ROUTER.route("http", "::1", port) is None


@pytest.mark.parametrize("lib", ["httpx2", "requests", "aiohttp"])
def test_stream_is_relayed_as_it_arrives(tracked: World, lib: str) -> None:
    """Each SSE event reaches the application while the upstream still holds back the
    rest: the SDK's routing does not buffer a stream. (A fresh upstream: the fake one
    idles C{gap} after a response before reading the next request on that connection.)"""
    gap = 0.3
    events = openai_sse_events(2)  # 6 events, one every gap
    with RecordingUpstream(Response(200, SSE, events, chunk_interval=gap)) as up:
        llmobserve.observe(
            proxy_url=tracked.proxy.url, provider_hosts={**tracked.hosts, up.authority: "openai"}
        )
        url = f"{up.url}/v1/chat/completions"
        t0 = time.perf_counter()
        first_at = None
        chunks: list[bytes] = []
        if lib == "httpx2":
            import httpx2

            with httpx2.stream("POST", url, content=b'{"stream":true}') as r:
                for chunk in r.iter_raw():
                    first_at = first_at or time.perf_counter() - t0
                    chunks.append(chunk)
        elif lib == "requests":
            import requests

            with requests.post(url, data=b'{"stream":true}', stream=True) as r2:
                for chunk in r2.raw.stream(65536, decode_content=False):
                    first_at = first_at or time.perf_counter() - t0
                    chunks.append(chunk)
        else:
            import aiohttp

            async def main() -> None:
                nonlocal first_at
                async with aiohttp.ClientSession() as s, s.post(url, data=b'{"stream":true}') as r3:
                    async for chunk in r3.content.iter_any():
                        first_at = first_at or time.perf_counter() - t0
                        chunks.append(chunk)

            asyncio.run(main())
        total = time.perf_counter() - t0
        [req] = up.requests
    assert b"".join(chunks) == b"".join(events)
    assert req.header("Via") is not None  # it did go through the proxy
    assert total >= 5 * gap
    assert first_at is not None and first_at < 2 * gap, (
        f"first chunk after {first_at:.2f}s of {total:.2f}s: the stream was buffered"
    )
