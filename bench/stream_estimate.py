"""The error of the stream-usage estimate against usage the API reported.

Run: .venv/bin/python bench/stream_estimate.py

Each case is a documented exchange: a request (messages, tools) and the
usage OpenAI reported for it, with the text of the reply where the source
shows it. The script streams the reply as chat chunks without a usage
chunk, runs it through C{parsers.analyse} (what the proxy does for a
stream without usage), and prints estimated against reported tokens per
case, then one answer line: the mean absolute error of prompt and
completion estimates, in percent. docs/PRICES.md quotes the figures.
"""

from __future__ import annotations

import json
from typing import Any

from parsers import Exchange, analyse

_WHEN = 1735689600.0  # 2025-01-01

_COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate"
        " jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on"
        " opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the"
        " client deliverable.",
    },
]

_WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]

#: (name, source, model, request fields, reply text or None, reported prompt, reported completion)
CASES: list[tuple[str, str, str, dict[str, Any], str | None, int, int | None]] = [
    (
        "cookbook-jargon-gpt-4o",
        "OpenAI cookbook, How to count tokens with tiktoken, section 6 (gpt-4o: 124 by the API)",
        "gpt-4o",
        {"messages": _COOKBOOK_MESSAGES},
        None,
        124,
        None,
    ),
    (
        "cookbook-jargon-gpt-4",
        "the same messages, gpt-4 (cl100k_base; 129 by the API): o200k stands in",
        "gpt-4",
        {"messages": _COOKBOOK_MESSAGES},
        None,
        129,
        None,
    ),
    (
        "cookbook-tools-gpt-4o",
        "OpenAI cookbook, same page, section 7 (weather tool; gpt-4o: 101 by the API)",
        "gpt-4o",
        {
            "messages": [
                {
                    "role": "system",
                    "content": "You are a helpful assistant that can answer to questions about"
                    " the weather.",
                },
                {"role": "user", "content": "What's the weather like in San Francisco?"},
            ],
            "tools": _WEATHER_TOOLS,
        },
        None,
        101,
        None,
    ),
    (
        "api-reference-hello",
        "OpenAI API reference, chat completion example (gpt-3.5-era sample: 9 + 12)",
        "gpt-4o-mini",
        {"messages": [{"role": "user", "content": "Hello!"}]},
        "\n\nHello there, how may I assist you today?",
        9,
        12,
    ),
    (
        "gateway-doc-gpt-5",
        "a gateway's documented gpt-5 exchange (developer + user; 18 + 20, reasoning hidden)",
        "gpt-5",
        {
            "messages": [
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"},
            ]
        },
        "Hi there! How can I help you today?",
        18,
        20,
    ),
]


def _stream(model: str, text: str) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
    words = [text[i : i + 4] for i in range(0, len(text), 4)] or [""]
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        *({**base, "choices": [{"index": 0, "delta": {"content": w}}]} for w in words),
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    lines = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
    return b"".join([*lines, b"data: [DONE]\n\n"])


def estimate(model: str, fields: dict[str, Any], text: str | None) -> dict[str, Any]:
    request = {"model": model, "stream": True, **fields}
    record = analyse(
        Exchange(
            method="POST",
            scheme="https",
            host="api.openai.com",
            port=443,
            path="/v1/chat/completions",
            query="",
            request_headers={"content-type": "application/json"},
            request_body=json.dumps(request).encode(),
            request_body_truncated=False,
            status=200,
            response_headers={"content-type": "text/event-stream"},
            response_body=_stream(model, text or ""),
            response_body_truncated=False,
            started_at=_WHEN,
        )
    )
    assert record.usage_source == "estimated", record
    return dict(record.usage)


def main() -> None:
    prompt_errors: list[float] = []
    completion_errors: list[float] = []
    for name, source, model, fields, text, prompt, completion in CASES:
        usage = estimate(model, fields, text)
        p_err = (usage["input_tokens"] - prompt) / prompt * 100
        prompt_errors.append(abs(p_err))
        line = f"{name:26} prompt {usage['input_tokens']:4} vs {prompt:4} ({p_err:+.1f}%)"
        if text is not None and completion is not None:
            c_err = (usage["output_tokens"] - completion) / completion * 100
            completion_errors.append(abs(c_err))
            line += f"  completion {usage['output_tokens']:3} vs {completion:3} ({c_err:+.1f}%)"
        print(f"{line}  [{source}]")
    mean_p = sum(prompt_errors) / len(prompt_errors)
    mean_c = sum(completion_errors) / len(completion_errors)
    print(
        f"stream estimate: mean |error| prompt {mean_p:.1f}% over {len(prompt_errors)} cases,"
        f" completion {mean_c:.1f}% over {len(completion_errors)} cases"
    )


if __name__ == "__main__":
    main()
