"""C{--stream-usage}: the real openai client, through a real proxy, against a fake
that behaves like the API (it sends the usage chunk only when asked).

The proxy runs in base-URL mode (C{/openai/...} -> the fake on 127.0.0.1) and
stores events in its embedded store; each test calls as its own customer and
reads that customer's event back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import (
    DEFAULT_RESPONSE,
    RecordedRequest,
    RecordingUpstream,
    Response,
    openai_sse_events,
)

from llmobserve.collector import EventStore

pytestmark = pytest.mark.timeout(90)

SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
MESSAGES = [{"role": "user", "content": "Say hello in four tokens."}]
#: The model name that makes the fake write its usage chunk one byte at a time.
SPLIT_MODEL = "gpt-4o-mini-split"
#: The model name that makes the fake pause 0.3 s between events.
SLOW_MODEL = "gpt-4o-mini-slow"


def fake_openai(req: RecordedRequest) -> Response:
    """Chat completions as the API streams them: the usage chunk only on request."""
    body = json.loads(req.body or b"{}")
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if not body.get("stream"):
        return DEFAULT_RESPONSE
    events = openai_sse_events(4, include_usage=usage)
    if body.get("model") == SPLIT_MODEL and usage:
        # the usage chunk, one byte per write: it reaches the proxy in many reads
        pieces = [
            *events[:-2],
            *(events[-2][i : i + 1] for i in range(len(events[-2]))),
            events[-1],
        ]
        return Response(200, SSE, pieces, chunk_interval=0.0005)
    if body.get("model") == SLOW_MODEL:
        return Response(200, SSE, events, chunk_interval=0.3)
    return Response(200, SSE, events, chunk_interval=0.002)


class Setup:
    def __init__(self, proxy: ProxyProcess, upstream: RecordingUpstream) -> None:
        self.proxy = proxy
        self.upstream = upstream

    def client(self, customer: str) -> Any:
        import openai

        return openai.OpenAI(
            api_key="sk-test",
            base_url=f"{self.proxy.url}/openai/v1",
            max_retries=0,
            default_headers={"X-LLMObserve-Customer-ID": customer},
        )

    def async_client(self, customer: str) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key="sk-test",
            base_url=f"{self.proxy.url}/openai/v1",
            max_retries=0,
            default_headers={"X-LLMObserve-Customer-ID": customer},
        )

    def upstream_body(self, customer: str) -> dict[str, Any]:
        """The JSON body the fake received for C{customer}'s (one) call."""
        return cast(dict[str, Any], json.loads(self.upstream_request(customer).body))

    def upstream_request(self, customer: str) -> RecordedRequest:
        self.upstream.wait_for(lambda: any(self._mine(r, customer) for r in self.upstream.requests))
        [req] = [r for r in self.upstream.requests if self._mine(r, customer)]
        return req

    @staticmethod
    def _mine(req: RecordedRequest, customer: str) -> bool:
        return bool(json.loads(req.body or b"{}").get("user") == customer)

    def event(self, customer: str, timeout: float = 15.0) -> dict[str, Any]:
        """The call event stored for C{customer}."""
        db = self.proxy.home / "events.sqlite3"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if db.exists():
                store = EventStore(db)
                try:
                    found = store.events(limit=None, customer=customer, kind="call")
                finally:
                    store.close()
                if found:
                    [event] = found
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no event for {customer}:\n{self.proxy.log_tail(30)}")


def _start(tmp: Any, name: str, *args: str) -> Iterator[Setup]:
    with RecordingUpstream(fake_openai) as upstream:
        proxy = ProxyProcess(
            [*LOOPBACK_ARGS, "--base-url", f"openai={upstream.url}", *args],
            workdir=tmp.mktemp(name),
        ).start()
        try:
            yield Setup(proxy, upstream)
        finally:
            proxy.terminate(5.0)


@pytest.fixture(scope="module")
def inject(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A proxy with the default modes (openai=inject)."""
    yield from _start(tmp_path_factory, "stream-usage-inject")


def _chunks(setup: Setup, customer: str, model: str = "gpt-4o-mini", **extra: Any) -> list[Any]:
    client = setup.client(customer)
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, user=customer, **extra
    )
    return list(stream)


def test_injected_usage_is_recorded_and_hidden_from_the_client(inject: Setup) -> None:
    """A stream that did not ask for usage: the proxy asks for it (and says so in
    Content-Length), the client sees no chunk with empty choices, byte for byte
    the stream it would have had, and the event has the reported usage and cost."""
    customer = "inject-sync"
    client = inject.client(customer)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, user=customer
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert raw == b"".join(openai_sse_events(4, include_usage=False))
    req = inject.upstream_request(customer)
    assert json.loads(req.body)["stream_options"] == {"include_usage": True}
    assert req.header("content-length") == b"%d" % len(req.body)
    event = inject.event(customer)
    assert event["usage_source"] == "reported"
    assert event["usage"]["input_tokens"] == 11 and event["usage"]["output_tokens"] == 4
    assert event["cost_usd"] is not None and event["cost_usd"] > 0
    assert event["streamed"] is True


def test_sync_client_sees_no_empty_choices_chunk(inject: Setup) -> None:
    """The openai client's chunks: every one has choices (code indexing
    choices[0] works), none carries usage."""
    chunks = _chunks(inject, "inject-chunks")
    assert len(chunks) == 6
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert inject.event("inject-chunks")["usage_source"] == "reported"


def test_async_client_sees_no_empty_choices_chunk(inject: Setup) -> None:
    """The same with AsyncOpenAI."""
    customer = "inject-async"

    async def main() -> list[Any]:
        async with inject.async_client(customer) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, user=customer
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert len(chunks) == 6 and all(c.choices for c in chunks)
    event = inject.event(customer)
    assert event["usage_source"] == "reported" and event["cost_usd"] > 0


def test_a_request_that_asked_for_usage_is_untouched(inject: Setup) -> None:
    """include_usage already set: the body is not rewritten, the client gets its
    usage chunk (empty choices, usage set)."""
    customer = "asked"
    chunks = _chunks(inject, customer, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 11
    req = inject.upstream_request(customer)
    assert req.header("accept-encoding") != b"identity"
    assert json.loads(req.body)["stream_options"] == {"include_usage": True}
    assert inject.event(customer)["usage_source"] == "reported"


def test_a_usage_chunk_split_into_single_bytes_is_still_removed(inject: Setup) -> None:
    """The fake writes the usage chunk one byte at a time: the proxy's filter
    reassembles it across reads and still removes exactly that event."""
    customer = "split"
    client = inject.client(customer)
    with client.chat.completions.with_streaming_response.create(
        model=SPLIT_MODEL, messages=MESSAGES, stream=True, user=customer
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert raw == b"".join(openai_sse_events(4, include_usage=False))
    assert inject.event(customer)["usage_source"] == "reported"


def test_a_body_over_the_bound_is_forwarded_unchanged_and_estimated(inject: Setup) -> None:
    """Over 1 MiB the body is not held: it streams upstream unchanged, and the
    event's usage is an estimate, priced and labelled so."""
    customer = "big"
    big = [{"role": "user", "content": "word " * 230_000}]  # ~1.1 MB of JSON
    client = inject.client(customer)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=big, stream=True, user=customer
        )
    )
    assert len(chunks) == 6
    assert "stream_options" not in inject.upstream_body(customer)
    event = inject.event(customer)
    assert event["usage_source"] == "estimated"
    assert event["cost_usd"] is not None and event["cost_usd"] > 0
    assert event["price_ref"].startswith("estimated (no usage in stream)")


@pytest.mark.parametrize("mode", ["estimate", "off"])
def test_estimate_and_off_modes_leave_the_request_alone(
    tmp_path_factory: pytest.TempPathFactory, mode: str
) -> None:
    """openai=estimate: nothing is injected, the usage is counted locally
    (estimated, priced); openai=off: nothing is injected nor estimated."""
    for setup in _start(
        tmp_path_factory, f"stream-usage-{mode}", "--stream-usage", f"openai={mode}"
    ):
        customer = f"mode-{mode}"
        chunks = _chunks(setup, customer)
        assert len(chunks) == 6
        assert "stream_options" not in setup.upstream_body(customer)
        event = setup.event(customer)
        if mode == "estimate":
            assert event["usage_source"] == "estimated"
            assert event["usage"]["input_tokens"] > 0 and event["usage"]["output_tokens"] > 0
            assert event["cost_usd"] is not None and event["price_ref"].startswith("estimated")
        else:
            assert event["usage_source"] == "missing" and event["cost_usd"] is None


def test_a_client_that_leaves_mid_stream_gets_an_estimate(inject: Setup) -> None:
    """The usage chunk never came (the client left first): the tokens seen so
    far are counted, and the event says so."""
    customer = "aborted"
    client = inject.client(customer)
    stream = client.chat.completions.create(
        model=SLOW_MODEL, messages=MESSAGES, stream=True, user=customer
    )
    first = [next(stream), next(stream)]
    stream.close()
    assert all(c.choices for c in first)
    event = inject.event(customer)
    assert event["outcome"] == "client_aborted"
    assert event["usage_source"] == "estimated" and event["cost_usd"] is not None
    assert "stream ended early" in event["price_ref"]


def test_a_realistic_mix_is_fully_priced_from_reported_usage(inject: Setup) -> None:
    """Issue 16's measure: half the streams without include_usage, the rest
    asking for it or not streamed; with injection on (the default) every call
    is priced, and from reported usage."""
    customers = []
    for i in range(8):
        customer = f"mix-{i}"
        customers.append(customer)
        client = inject.client(customer)
        extra: dict[str, Any] = {"user": customer}
        if i % 2 == 0:
            extra["stream"] = True  # no include_usage: what most clients send
        elif i % 4 == 1:
            extra |= {"stream": True, "stream_options": {"include_usage": True}}
        result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **extra)
        if extra.get("stream"):
            list(result)
    events = [inject.event(c) for c in customers]
    assert all(e["cost_usd"] is not None and e["cost_usd"] > 0 for e in events)
    assert {e["usage_source"] for e in events} == {"reported"}
