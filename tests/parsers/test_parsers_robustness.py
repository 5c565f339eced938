"""Streams split anywhere, garbage, bombs, malformed JSON, threads: never an exception."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsers_testkit import CHAT_COMPLETION, PINECONE_QUERY, exchange, openai_chat_stream, sse
from test_parsers_llm_providers import GEMINI, MESSAGE, _gemini_chunks, anthropic_stream

from parsers import REGISTRY, analyse
from parsers.decoding import decode_body
from parsers.sse import EventStream, SSEDecoder

STREAMS = {
    "openai": ("api.openai.com", "/v1/chat/completions", openai_chat_stream(12)),
    "anthropic": ("api.anthropic.com", "/v1/messages", anthropic_stream(8)),
    "gemini": (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-1.5-flash:streamGenerateContent",
        sse(_gemini_chunks(6)),
    ),
}


def _decode(chunks: list[bytes]) -> list[object]:
    decoder = SSEDecoder()
    events: list[object] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_split_at_every_offset_same_events(name: str, line_end: bytes) -> None:
    """Every two-way split of every stream decodes to the same events as the whole body,
    and the from-both-ends reader agrees with the incremental decoder."""
    body = STREAMS[name][2].replace(b"\n", line_end)
    whole = _decode([body])
    assert len(whole) > 5
    stream = EventStream(body)
    assert list(stream.head()) == whole
    assert list(reversed(list(stream.tail()))) == whole
    for i in range(len(body) + 1):
        assert _decode([body[:i], body[i:]]) == whole, i


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(STREAMS)))
def test_random_multi_splits_same_events(data: st.DataObject, name: str) -> None:
    """Any number of splits, anywhere (mid-UTF-8, mid-CRLF), gives the same events."""
    body = STREAMS[name][2].replace(b"\n", data.draw(st.sampled_from([b"\n", b"\r\n"])))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert _decode(chunks) == _decode([body])


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_prefix_is_total_and_monotone(name: str) -> None:
    """A stream cut at any byte gives a record without exception or parse error; once
    usage appears it is the usage of the events seen so far, never a sum (a
    prefix without usage may be estimated instead: not a reported figure)."""
    host, path, body = STREAMS[name]
    full = analyse(exchange(host, path, body, content_type="text/event-stream"))
    assert full.usage_source == "reported" and not full.flags
    for i in range(0, len(body) + 1, 3):
        record = analyse(exchange(host, path, body[:i], content_type="text/event-stream"))
        assert "parser_exception" not in record.flags
        assert record.parse_error is None, (i, record.parse_error)
        if record.usage_source == "estimated":
            continue
        for key, value in record.usage.items():
            assert value <= full.usage.get(key, value), (i, key)


BODIES = [
    json.dumps(CHAT_COMPLETION).encode(),
    json.dumps(MESSAGE).encode(),
    json.dumps(GEMINI).encode(),
    json.dumps(PINECONE_QUERY).encode(),
    openai_chat_stream(3),
    anthropic_stream(2),
]
HOSTS = sorted(
    {p.hosts[0].replace("*.", "x.").replace(".*.", ".r1.").replace("*-", "r-") for p in REGISTRY}
    | {"api.example.com"}
)


@settings(max_examples=300, deadline=None)
@given(
    host=st.sampled_from(HOSTS),
    path=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/messages",
            "/query",
            "/graphql",
            "/v1/responses",
            "/vectors/upsert",
            "/model/x/converse-stream",
            "/v1beta/models/m:streamGenerateContent",
            "/v2/chat",
            "/",
        ]
    ),
    body=st.one_of(
        st.binary(max_size=400),
        st.sampled_from(BODIES).flatmap(
            lambda b: st.tuples(st.just(b), st.integers(0, len(b)), st.binary(max_size=8)).map(
                lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
            )
        ),
    ),
    request=st.one_of(st.binary(max_size=200), st.just(b'{"query": "{ a }"}')),
    ctype=st.sampled_from(["application/json", "text/event-stream", "text/plain", ""]),
    encoding=st.sampled_from([None, "gzip", "br", "deflate", "zstd", "gzip, gzip, gzip"]),
    status=st.sampled_from([200, 400, 500, None]),
)
def test_garbage_never_raises(
    host: str,
    path: str,
    body: bytes,
    request: bytes,
    ctype: str,
    encoding: str | None,
    status: int | None,
) -> None:
    """Random and mutated bodies to every provider parser: always a record, and never the
    last-resort exception handler (so no parser hides a crash)."""
    headers = {"content-encoding": encoding} if encoding else {}
    ex = exchange(
        host,
        path,
        body,
        request=request,
        content_type=ctype,
        response_headers=headers,
        status=status or 200,
    )
    record = analyse(ex)
    assert "parser_exception" not in record.flags, record.parse_error
    assert record.usage_source in ("reported", "estimated", "missing")
    assert record.cost_usd is None or record.cost_usd >= 0


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
        b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": NaN, "completion_tokens": 1}}',
        b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": Infinity}}',
        b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 1, "completion_tokens": 1}',
        "\ufeff".encode() + json.dumps(CHAT_COMPLETION).encode(),
        json.dumps(CHAT_COMPLETION).encode("utf-16"),
        b'{"model": "gpt-4o-mini", "usage": null}',
        b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": "12", "completion_tokens": "3"}}',
        b'{"model": "gpt-4o-mini", "usage": {"prompt_tokens": -5, "completion_tokens": true}}',
        b'{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}',
        b"\xff\xfe\xfd",
        b"",
    ],
)
def test_malformed_json_is_recorded(body: bytes) -> None:
    """Deep nesting, huge ints, NaN, truncation, BOM, UTF-16, null or odd usage: a record,
    a parse_error where the body is unreadable, and never a silent zero."""
    record = analyse(exchange("api.openai.com", "/v1/chat/completions", body))
    assert "parser_exception" not in record.flags
    if record.usage:
        assert all(v >= 0 for v in record.usage.values())
    else:
        assert record.usage_source == "missing" and record.cost_usd is None


def test_numbers_as_strings_and_bom_are_read() -> None:
    """Numbers quoted as strings count; a UTF-8 BOM or UTF-16 body still parses."""
    quoted = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":"12","completion_tokens":"3"}}',
        )
    )
    assert quoted.usage == {"input_tokens": 12, "output_tokens": 3}
    for raw in (
        "\ufeff".encode() + json.dumps(CHAT_COMPLETION).encode(),
        json.dumps(CHAT_COMPLETION).encode("utf-16"),
    ):
        record = analyse(exchange("api.openai.com", "/v1/chat/completions", raw))
        assert record.usage["input_tokens"] == 1200 and record.parse_error is None


def test_nan_is_refused() -> None:
    """NaN never reaches the cost arithmetic."""
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":NaN}}',
        )
    )
    assert record.parse_error is not None and record.cost_usd is None


def test_gzip_and_br_bodies_are_read() -> None:
    """Compressed bodies are decoded for parsing."""
    raw = json.dumps(CHAT_COMPLETION).encode()
    for coding, data in (
        ("gzip", gzip.compress(raw)),
        ("br", brotli.compress(raw)),
        ("deflate", zlib.compress(raw)),
    ):
        record = analyse(
            exchange(
                "api.openai.com",
                "/v1/chat/completions",
                data,
                response_headers={"content-encoding": coding},
            )
        )
        assert record.usage["input_tokens"] == 1200, coding


def test_decompression_bomb_stops_at_the_cap() -> None:
    """1 GiB of zeros gzipped: decoding stops at the cap, quickly, flagged truncated."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    data = b"".join(bomb.compress(chunk) for _ in range(1024)) + bomb.flush()
    start = time.process_time()
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            data,
            response_headers={"content-encoding": "gzip"},
        )
    )
    assert time.process_time() - start < 2.0
    assert "parse_truncated" in record.flags
    assert record.parse_error is not None  # zeros are not JSON
    small = decode_body(data, "gzip", cap=1000)
    assert len(small.data) == 1000 and small.truncated


def test_a_finished_stream_past_the_cap_is_cut_and_says_so() -> None:
    """A brotli stream that ends within one output step but past the cap
    (and a gzip one) comes back cut at the cap, flagged truncated."""
    for coding, data in (
        ("br", brotli.compress(b"a" * 5000)),
        ("gzip", gzip.compress(b"a" * 5000)),
    ):
        decoded = decode_body(data, coding, cap=1000)
        assert decoded.data == b"a" * 1000 and decoded.truncated, coding
        whole = decode_body(data, coding, cap=5000)
        assert whole.data == b"a" * 5000 and not whole.truncated, coding


def test_coding_chains_and_lies_are_refused() -> None:
    """A 20-layer chain is refused; 'gzip' that is not gzip is a parse error."""
    assert decode_body(b"x", ", ".join(["gzip"] * 20)).error is not None
    record = analyse(
        exchange(
            "api.openai.com",
            "/v1/chat/completions",
            json.dumps(CHAT_COMPLETION).encode(),
            response_headers={"content-encoding": "gzip"},
        )
    )
    assert record.parse_error is not None and "gzip" in record.parse_error


def test_oversized_sse_event_is_dropped_and_counted() -> None:
    """An event over the maximum is dropped, counted, and decoding carries on."""
    decoder = SSEDecoder(max_line=1000, max_event=1000)
    events = decoder.feed(b"data: " + b"x" * 5000 + b"\n\ndata: ok\n\n") + decoder.close()
    assert [e.data for e in events] == [b"ok"]
    assert decoder.dropped == 1
    decoder = SSEDecoder(max_line=1000, max_event=1000)
    events = []
    for _ in range(10):  # an unterminated line growing chunk by chunk
        events += decoder.feed(b"y" * 500)
    events += decoder.feed(b"\n\ndata: ok\n\n") + decoder.close()
    assert [e.data for e in events] == [b"ok"] and decoder.dropped == 1


def test_thread_safety() -> None:
    """analyse from several threads gives the same records as one thread."""
    exchanges = [
        exchange(h, p, b, content_type="text/event-stream") for h, p, b in STREAMS.values()
    ]
    exchanges += [
        exchange("api.openai.com", "/v1/chat/completions", {**CHAT_COMPLETION, "model": m})
        for m in ("gpt-4o-mini", "gpt-4o", "o1", "gpt-4.1", "nope-model")
    ]
    expected = [analyse(e) for e in exchanges]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(analyse, exchanges * 50))
    assert results == expected * 50
