"""C{--stream-usage} in the parsers: the request rewrite, the usage-chunk filter
(fed the same stream split at every offset), and the estimate for streams
that carry no usage."""

from __future__ import annotations

import json

import pytest
from parsers_testkit import exchange
from support.upstreams import openai_sse_events

from parsers import Exchange, analyse
from parsers.estimate import count_tokens, prompt_tokens
from parsers.streamusage import (
    UsageChunkFilter,
    inject_include_usage,
    is_usage_only_event,
    usage_injectable_path,
)

WITH_USAGE = b"".join(openai_sse_events(4, include_usage=True))
WITHOUT_USAGE = b"".join(openai_sse_events(4, include_usage=False))


# -- the request rewrite ------------------------------------------------------


def test_the_field_is_inserted_and_every_other_byte_kept() -> None:
    body = b' {"model": "gpt-4o", "stream": true, "messages": [{"content": "caf\\u00e9"}]}'
    new = inject_include_usage(body)
    assert new == b' {"stream_options":{"include_usage":true},' + body[2:]
    assert json.loads(new)["stream_options"] == {"include_usage": True}


def test_a_request_that_asked_for_usage_is_left_alone() -> None:
    body = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert inject_include_usage(body) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":false,"messages":[]}',
        b'{"messages":[]}',
        b'{"stream":"true"}',
        b"not json",
        b"[1, 2]",
        b'{"stream":true',
    ],
)
def test_no_rewrite_for_what_is_not_a_streamed_json_object(body: bytes) -> None:
    assert inject_include_usage(body) is None


def test_stream_options_without_include_usage_is_completed() -> None:
    """Other stream options are kept; include_usage false is turned on too (the
    filter takes the chunk out again, so the client sees no difference)."""
    for options in ({"include_obfuscation": False}, {"include_usage": False}):
        body = json.dumps({"stream": True, "stream_options": options}).encode()
        new = inject_include_usage(body)
        assert new is not None
        assert json.loads(new)["stream_options"] == {**options, "include_usage": True}


def test_only_completion_paths_take_stream_options() -> None:
    assert usage_injectable_path("/v1/chat/completions")
    assert usage_injectable_path("/openai/deployments/x/chat/completions/")
    assert usage_injectable_path("/v1/completions")
    assert not usage_injectable_path("/v1/responses")
    assert not usage_injectable_path("/v1/embeddings")


# -- the response filter ------------------------------------------------------


def _filtered(stream: bytes, step: int) -> bytes:
    f = UsageChunkFilter()
    out = [f.feed(stream[i : i + step]) for i in range(0, len(stream), step)]
    return b"".join(out) + f.close()


def test_the_usage_event_is_removed_whatever_the_split() -> None:
    """Split into pieces of every size from 1 byte to the whole stream."""
    for step in range(1, len(WITH_USAGE) + 1):
        assert _filtered(WITH_USAGE, step) == WITHOUT_USAGE, step


def test_the_usage_event_is_removed_at_every_single_cut() -> None:
    """Two pieces, cut at every offset (a blank line split across reads included)."""
    for cut in range(len(WITH_USAGE) + 1):
        f = UsageChunkFilter()
        out = f.feed(WITH_USAGE[:cut]) + f.feed(WITH_USAGE[cut:]) + f.close()
        assert out == WITHOUT_USAGE, cut
        assert f.removed == 1


def test_crlf_streams_are_filtered_too() -> None:
    crlf = WITH_USAGE.replace(b"\n", b"\r\n")
    assert _filtered(crlf, 7) == WITHOUT_USAGE.replace(b"\n", b"\r\n")


def test_a_stream_without_the_usage_event_passes_unchanged() -> None:
    for step in (1, 5, 64, len(WITHOUT_USAGE)):
        assert _filtered(WITHOUT_USAGE, step) == WITHOUT_USAGE


def test_only_a_possible_usage_event_is_withheld() -> None:
    """A content chunk split mid-event is passed on as soon as its choices show
    it is not the usage chunk; the usage chunk's start is held until it ends."""
    content = openai_sse_events(1, include_usage=True)[1]
    at = content.index(b'"choices":[') + len(b'"choices":[') + 1
    f = UsageChunkFilter()
    assert f.feed(content[:at]) == content[:at]
    assert f.feed(content[at:]) == content[at:]
    usage = openai_sse_events(1, include_usage=True)[-2]
    assert f.feed(usage[:-3]) == b""
    assert f.feed(usage[-3:]) == b""
    assert f.removed == 1


def test_an_empty_choices_event_without_usage_is_kept() -> None:
    """Azure's first chunk (empty choices, prompt_filter_results) is not the usage chunk."""
    event = b'data: {"choices":[],"prompt_filter_results":[]}\n\n'
    assert not is_usage_only_event(event)
    assert _filtered(event + WITHOUT_USAGE, 3) == event + WITHOUT_USAGE


def test_an_unterminated_event_is_given_back_at_close() -> None:
    usage = openai_sse_events(1, include_usage=True)[-2]
    f = UsageChunkFilter()
    assert f.feed(usage[:-2]) == b""
    assert f.close() == usage[:-2]


def test_what_is_held_is_bounded() -> None:
    f = UsageChunkFilter(max_held=100)
    head = b'data: {"id":"' + b"x" * 200
    assert f.feed(head) == head  # past the bound: passed on, not held


# -- the estimate --------------------------------------------------------------


def test_o200k_counts_from_the_shipped_ranks() -> None:
    """Token counts of o200k_base, read offline from parsers/data."""
    assert count_tokens("hello world") == 2
    assert count_tokens("") == 0


def test_chat_prompt_framing() -> None:
    """3 tokens a message, 1 for a name, 3 for the reply's priming (OpenAI's cookbook)."""
    one = {"messages": [{"role": "user", "content": "hello world"}]}
    assert prompt_tokens(one) == 3 + 3 + count_tokens("user") + 2
    named = {"messages": [{"role": "user", "name": "bob", "content": "hello world"}]}
    base = prompt_tokens(one)
    assert base is not None
    assert prompt_tokens(named) == base + count_tokens("bob") + 1
    assert prompt_tokens({"prompt": "hello world"}) == 2


REQUEST = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _stream_exchange(body: bytes) -> Exchange:
    return exchange(
        "api.openai.com",
        "/v1/chat/completions",
        body,
        request=REQUEST,
        content_type="text/event-stream",
    )


def test_a_stream_without_usage_is_estimated_and_priced() -> None:
    record = analyse(_stream_exchange(WITHOUT_USAGE))
    assert record.usage_source == "estimated"
    prompt = 3 + 3 + count_tokens("user") + count_tokens("hi")
    assert record.usage == {
        "input_tokens": prompt,
        "output_tokens": count_tokens("tok0 tok1 tok2 tok3 "),
    }
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.price_ref is not None
    assert record.price_ref.startswith("estimated (no usage in stream): ")


def test_a_stream_cut_short_is_estimated_with_its_reason() -> None:
    cut = WITHOUT_USAGE[: WITHOUT_USAGE.index(b"tok2")]
    record = analyse(_stream_exchange(cut))
    assert record.usage_source == "estimated"
    assert record.price_ref is not None and "stream ended early" in record.price_ref


def test_reported_usage_wins_and_off_means_no_estimate() -> None:
    assert analyse(_stream_exchange(WITH_USAGE)).usage_source == "reported"
    off = analyse(_stream_exchange(WITHOUT_USAGE), no_estimate={"openai"})
    assert off.usage_source == "missing" and off.cost_usd is None


def test_the_cookbook_examples_are_counted_as_the_api_did() -> None:
    """OpenAI's cookbook (How to count tokens with tiktoken) shows gpt-4o
    reporting 124 prompt tokens for its six-message example and 101 for its
    weather-tool example: the estimate gives the same figures."""
    from bench.stream_estimate import CASES

    cases = {name: (fields, prompt) for name, _, _, fields, _, prompt, _ in CASES}
    for name in ("cookbook-jargon-gpt-4o", "cookbook-tools-gpt-4o"):
        fields, reported = cases[name]
        assert prompt_tokens(fields) == reported, name
