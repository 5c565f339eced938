"""
RELIABILITY.md T24, real processes: decompression bombs from the upstream.

An OpenAI-shaped upstream answers with C{Content-Encoding: gzip} over 1 GiB
of zeros (~1 MiB on the wire), a brotli bomb (1 GiB of zeros in a few KiB),
a body gzipped 20 times over and labelled so, and a body that says gzip and
is not. The proxy relays what the upstream sent, byte for byte (it never
decodes a body on the way through); only the parsers decode, from their
bounded copy, and stop at their cap. The parsers' side is tested case by
case in C{tests/parsers/test_parsers_robustness.py}; here it is the whole
proxy, its memory, its CPU and its event loop.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest
from support.clients import proxy_request, raw_request
from support.hostile import store_events
from support.load import HEALTH_REQUEST, loadgen, results
from support.proxy import LOOPBACK_ARGS, ProxyProcess, RSSSampler
from support.upstreams import MiB, RecordingUpstream, Response

pytestmark = pytest.mark.timeout(60)

_ZEROS = 1 << 30  # decoded size of the two bombs


def _gzip_bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    block = bytes(MiB)
    return b"".join([*(packer.compress(block) for _ in range(_ZEROS // MiB)), packer.flush()])


def _brotli_bomb() -> bytes:
    packer = brotli.Compressor(quality=5)
    block = bytes(MiB)
    return b"".join([*(packer.process(block) for _ in range(_ZEROS // MiB)), packer.finish()])


def _nested_gzip(layers: int) -> bytes:
    body = json.dumps({"model": "gpt-4o-mini", "usage": {"prompt_tokens": 3}}).encode()
    for _ in range(layers):
        body = gzip.compress(body, 1)
    return body


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[str, bytes]]:
    """Case name -> (Content-Encoding, body as sent)."""
    return {
        "gzip 1 GiB": ("gzip", _gzip_bomb()),
        "br 1 GiB": ("br", _brotli_bomb()),
        "gzip x20": (", ".join(["gzip"] * 20), _nested_gzip(20)),
        "not gzip": ("gzip", b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":3}}'),
    }


@pytest.fixture
def bomb_proxy(tmp_path: Path) -> Iterator[tuple[ProxyProcess, RecordingUpstream]]:
    upstream = RecordingUpstream()
    with upstream:
        proxy = ProxyProcess(
            (*LOOPBACK_ARGS, "--provider-host", f"{upstream.authority}=openai"),
            workdir=tmp_path,
        ).start()
        with proxy:
            yield proxy, upstream


def test_bombs_are_relayed_as_sent_and_parsed_only_to_the_cap(
    bomb_proxy: tuple[ProxyProcess, RecordingUpstream], bombs: dict[str, tuple[str, bytes]]
) -> None:
    """
    T24: each bomb reaches the client unchanged; its event says the parse
    stopped (C{parse_truncated}) or failed (C{parse_error}); proxy RSS grows
    by less than 64 MiB, its CPU per bomb stays under 2 s, and the event
    loop keeps answering C{/health} within 100 ms (p99).
    """
    proxy, upstream = bomb_proxy
    cpu: dict[str, float] = {}
    with RSSSampler(proxy) as rss:
        # /health every 20 ms, from a process of its own
        probe = loadgen("latency", proxy.port, HEALTH_REQUEST, 5.0, "--gap", "0.02")
        try:
            time.sleep(0.5)  # the probe is under way
            for name, (encoding, body) in bombs.items():
                upstream.respond_with(
                    Response(
                        headers=[
                            ("Content-Type", "application/json"),
                            ("Content-Encoding", encoding),
                        ],
                        body=body,
                    )
                )
                before = proxy.cpu_seconds()
                request = proxy_request(
                    proxy.port,
                    "POST",
                    upstream.url + f"/v1/chat/completions?case={len(cpu)}",
                    [("Accept-Encoding", "gzip, br")],
                    b'{"model":"gpt-4o-mini"}',
                )
                resp = raw_request(proxy.port, request, method="POST", timeout=30)
                assert resp.status == 200, (name, resp.status)
                assert resp.body == body, f"{name}: the body was changed on the way"
                assert resp.header("content-encoding") == encoding.encode(), name
                deadline = time.monotonic() + 10
                while len(_events(proxy)) < len(cpu) + 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                cpu[name] = proxy.cpu_seconds() - before
        finally:
            (health,) = results(probe, timeout=30)
    events = _events(proxy)
    assert len(events) == len(bombs), events
    for name, event in zip(bombs, events, strict=True):
        flags = json.loads(event["flags"] or "[]")
        assert "parse_truncated" in flags or event["parse_error"], (name, event)
        assert cpu[name] < 2.0, f"{name}: {cpu[name]:.2f} s of proxy CPU"
    assert rss.growth_kib < 64 * 1024, f"RSS grew {rss.growth_kib / 1024:.0f} MiB"
    assert health["errors"] == 0 and health["non2xx"] == 0, health
    assert health["latency_us"]["n"] >= 100, health
    p99_ms = health["latency_us"]["p99"] / 1000
    assert p99_ms < 100, f"/health p99 {p99_ms:.0f} ms while bombs were parsed"
    assert proxy.running, proxy.log_tail()


def _events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The stored call events, in the order of the requests (their ?case=)."""
    rows = [e for e in store_events(proxy.home / "events.sqlite3") if e["kind"] == "call"]
    return sorted(rows, key=lambda e: e["ts"])
