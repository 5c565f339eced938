"""Parse + price time per call: a chat response, a 200-chunk stream, a Pinecone query.

Run: .venv/bin/python bench/parse_bench.py [--seconds 0.3]

Prints one line per case (median and best of several timed rounds, in
microseconds per call, against the PERFORMANCE.md target) and, as a
baseline measured in the same run, one bare genai_prices.calc_price call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from genai_prices import Usage, calc_price

from parsers import Exchange, analyse

_WHEN = 1725148800.0


def _exchange(host: str, path: str, body: bytes, ctype: str) -> Exchange:
    return Exchange(
        method="POST",
        scheme="https",
        host=host,
        port=443,
        path=path,
        query="",
        request_headers={"content-type": "application/json"},
        request_body=b"{}",
        request_body_truncated=False,
        status=200,
        response_headers={"content-type": ctype},
        response_body=body,
        response_body_truncated=False,
        started_at=_WHEN,
    )


def _chat() -> Exchange:
    body = {
        "id": "chatcmpl-9xYz",
        "object": "chat.completion",
        "created": 1725148800,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How can I help you today? " * 8,
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_483d39d857",
    }
    return _exchange(
        "api.openai.com", "/v1/chat/completions", json.dumps(body).encode(), "application/json"
    )


def _stream(chunks: int = 200) -> Exchange:
    base = {
        "id": "chatcmpl-AbC123",
        "object": "chat.completion.chunk",
        "created": 1725148800,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_483d39d857",
    }
    lines = []
    for i in range(chunks):
        event = {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": f" tok{i}"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
        lines.append(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": chunks,
        "total_tokens": 1200 + chunks,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    final = {**base, "choices": [], "usage": usage}
    lines.append(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
    lines.append(b"data: [DONE]\n\n")
    return _exchange("api.openai.com", "/v1/chat/completions", b"".join(lines), "text/event-stream")


def _pinecone() -> Exchange:
    body = {
        "results": [],
        "matches": [
            {"id": f"vec-{i}", "score": 0.9 - i / 100, "values": [], "metadata": {"genre": "drama"}}
            for i in range(10)
        ],
        "namespace": "ns1",
        "usage": {"readUnits": 6},
    }
    return _exchange(
        "my-index-abc1234.svc.aped-4627-b74a.pinecone.io",
        "/query",
        json.dumps(body).encode(),
        "application/json",
    )


def _rounds(fn: Callable[[], object], seconds: float, rounds: int = 7) -> tuple[float, float]:
    fn()  # warm caches: the steady state is what a long-running proxy sees
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start > seconds / rounds / 4:
            break
        number *= 2
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(samples), min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per case")
    args = parser.parse_args()
    stamp = datetime.fromtimestamp(_WHEN, UTC)
    usage = Usage(input_tokens=1200, cache_read_tokens=1024, output_tokens=300)
    chat, stream, pinecone = _chat(), _stream(), _pinecone()
    cases: list[tuple[str, Callable[[], object], float | None]] = [
        ("chat response (parse+price)", lambda: analyse(chat), 30.0),
        ("200-chunk stream (parse+price)", lambda: analyse(stream), 300.0),
        ("pinecone query (parse+price)", lambda: analyse(pinecone), None),
        (
            "baseline: one genai_prices.calc_price",
            lambda: calc_price(
                usage, "gpt-4o-mini-2024-07-18", provider_id="openai", genai_request_timestamp=stamp
            ),
            None,
        ),
    ]
    for name, fn, target in cases:
        median, best = _rounds(fn, args.seconds)
        verdict = (
            ""
            if target is None
            else (f"  target <= {target:.0f} us: {'ok' if median <= target else 'MISSED'}")
        )
        print(f"{name:40s} median {median:7.1f} us/call  best {best:7.1f} us/call{verdict}")


if __name__ == "__main__":
    main()
