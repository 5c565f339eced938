"""
RELIABILITY.md T23 in real processes: malformed JSON and SSE from an OpenAI upstream.

Each case of the bad-input table's upstream section goes through a real
proxy: the client must get the upstream's bytes unchanged, and the call
one stored event (with C{parse_error} or no usage where the body says
nothing usable), whatever the parser made of it. The parsers' answers to
the same inputs are tested one by one in C{tests/parsers/}; here it is
the proxy around them: no case loses its event to an exception, and the
parse pool is not wedged afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.clients import chat_request, raw_request
from support.hostile import store_events
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream, Response

pytestmark = pytest.mark.timeout(60)

ProxyFactory = Callable[..., ProxyProcess]

_USAGE = b'"usage":{"prompt_tokens":11,"completion_tokens":7}'
_GOOD = b'{"id":"c1","model":"gpt-4o-mini",' + _USAGE + b"}"
_JSON = [("Content-Type", "application/json")]
_SSE = [("Content-Type", "text/event-stream")]


def _sse(*events: bytes, sep: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + e + sep for e in events)


_CHUNK = b'{"id":"c1","model":"gpt-4o-mini","choices":[{"delta":{"content":"hi"}}]}'
_USAGE_CHUNK = b'{"id":"c1","model":"gpt-4o-mini","choices":[],' + _USAGE + b"}"

#: name -> (headers, body as the upstream sends it, pieces: one write each when > 1)
CASES: dict[str, tuple[list[tuple[str, str]], bytes, int]] = {
    "deep nesting": (_JSON, b'{"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 1),
    "5,000-digit int": (
        _JSON,
        b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":1' + b"0" * 5000 + b"}}",
        1,
    ),
    "NaN": (_JSON, b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":NaN}}', 1),
    "lone surrogate": (_JSON, b'{"model":"\\ud800x",' + _USAGE + b"}", 1),
    "duplicate usage": (_JSON, b'{"usage":{"prompt_tokens":1},' + _GOOD[1:], 1),
    "truncated": (_JSON, _GOOD[: len(_GOOD) // 2], 1),
    "BOM": (_JSON, b"\xef\xbb\xbf" + _GOOD, 1),
    "missing usage": (_JSON, b'{"id":"c1","model":"gpt-4o-mini","choices":[]}', 1),
    "not JSON": (_JSON, b"<html>502 Bad Gateway</html>", 1),
    "SSE split at every byte": (_SSE, _sse(_CHUNK, _USAGE_CHUNK, b"[DONE]"), -1),
    "SSE mixed line endings": (
        _SSE,
        b"data: " + _CHUNK + b"\r\n\r\ndata: " + _USAGE_CHUNK + b"\r\rdata: [DONE]\n\n",
        1,
    ),
    "SSE 5 MB event": (_SSE, _sse(b'{"x":"' + b"y" * (5 << 20) + b'"}', _USAGE_CHUNK), 1),
    "SSE no [DONE]": (_SSE, _sse(_CHUNK, _USAGE_CHUNK), 1),
    "SSE error mid-stream": (
        _SSE,
        _sse(_CHUNK) + b'event: error\ndata: {"error":{"message":"overloaded"}}\n\n',
        1,
    ),
    "SSE missing usage": (_SSE, _sse(_CHUNK, b"[DONE]"), 1),
}


#: What each case's event says: its usage, a parse error (and no usage), no
#: usage and no error, or a flag.
EXPECTED: dict[str, str] = {
    "deep nesting": "error",
    "5,000-digit int": "error",
    "NaN": "error",
    "lone surrogate": "usage",
    "duplicate usage": "usage",  # the last one, as JSON parsers read it
    "truncated": "error",
    "BOM": "usage",
    "missing usage": "nothing",
    "not JSON": "error",
    "SSE split at every byte": "usage",
    "SSE mixed line endings": "usage",
    "SSE 5 MB event": "parse_truncated",
    "SSE no [DONE]": "stream_incomplete",
    "SSE error mid-stream": "stream_error_event",
    "SSE missing usage": "usage_not_in_stream",
}


def _response(headers: list[tuple[str, str]], body: bytes, pieces: int) -> Response:
    if pieces == -1:  # one byte per chunk: every split point the parser can meet
        return Response(headers=headers, body=[body[i : i + 1] for i in range(len(body))])
    return Response(headers=headers, body=body)


def _call_events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    rows = [e for e in store_events(proxy.home / "events.sqlite3") if e["kind"] == "call"]
    return sorted(rows, key=lambda e: e["ts"])


def test_malformed_bodies_are_relayed_unchanged_and_each_is_one_event(
    proxy_factory: ProxyFactory,
) -> None:
    """
    T23: every case reaches the client byte for byte and becomes exactly one
    event that says what was made of it (L{EXPECTED}); then a normal call's
    event is stored within a second.
    """
    with RecordingUpstream() as upstream:
        proxy = proxy_factory(*LOOPBACK_ARGS, "--provider-host", f"{upstream.authority}=openai")
        request = chat_request(proxy.port, upstream.url)
        for name, (headers, body, pieces) in CASES.items():
            upstream.respond_with(_response(headers, body, pieces))
            resp = raw_request(proxy.port, request, method="POST", timeout=30)
            assert resp.status == 200, (name, resp.status)
            assert resp.body == body, f"{name}: the body was changed on the way"
        upstream.respond_with(Response(headers=_JSON, body=_GOOD))
        sent = time.monotonic()
        assert raw_request(proxy.port, request, method="POST", timeout=10).status == 200
        while len(_call_events(proxy)) < len(CASES) + 1 and time.monotonic() < sent + 1.0:
            time.sleep(0.02)
        events = _call_events(proxy)
        assert len(events) == len(CASES) + 1, f"{len(events)} events for {len(CASES) + 1} calls"
        assert proxy.running, proxy.log_tail()

    *bad, normal = events
    for name, event in zip(CASES, bad, strict=True):
        usage = json.loads(event["usage"] or "{}")
        flags = json.loads(event["flags"] or "[]")
        expected = EXPECTED[name]
        if expected == "usage":
            assert usage == {"input_tokens": 11, "output_tokens": 7}, (name, event)
        elif expected == "error":
            assert event["parse_error"] and not usage, (name, event)
        elif expected == "nothing":
            assert not usage and not event["parse_error"], (name, event)
        else:
            assert expected in flags, (name, event)
        assert event["provider"] == "openai", (name, event)
    assert json.loads(normal["usage"]) == {"input_tokens": 11, "output_tokens": 7}
    assert normal["parse_error"] is None
