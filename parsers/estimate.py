"""Estimated usage for OpenAI-style streams that carry none.

A stream without C{stream_options.include_usage} (or cut short by the
client) reports no tokens. Here they are counted: prompt tokens from the
request's messages (OpenAI's documented chat framing: 3 tokens a message,
1 more for a C{name}, 3 for the reply's priming), completion tokens from
the streamed deltas (content, refusal, tool-call names and arguments).
The tokenizer is tiktoken's C{o200k_base} (gpt-4o, gpt-4.1, gpt-5, o-series),
read from the copy shipped in C{parsers/data} (tiktoken itself would fetch
it from the network at first use); the same encoding stands in for every
other model, an approximation documented in docs/PRICES.md with its
measured error. Without tiktoken, bytes/4.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from collections.abc import Iterable
from importlib import resources
from typing import Any, Final

from ._call import Call
from ._draft import UsageDraft
from .jsonbody import BodyError, loads

__all__ = ["count_tokens", "estimate_stream_usage", "prompt_tokens", "streamed_text"]

_PER_MESSAGE: Final = 3
_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3
_MAX_EVENTS: Final = 100_000

_O200K_PATTERN: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_lock = threading.Lock()
_encoding: Any = None  # the tiktoken Encoding, or False when tiktoken is missing


def _load_encoding() -> Any:
    global _encoding
    with _lock:
        if _encoding is None:
            try:
                import tiktoken
            except ImportError:
                _encoding = False
                return _encoding
            data = resources.files("parsers").joinpath("data/o200k_base.tiktoken.gz").read_bytes()
            ranks = {
                base64.b64decode(token): int(rank)
                for token, rank in (
                    line.split() for line in gzip.decompress(data).splitlines() if line
                )
            }
            _encoding = tiktoken.Encoding(
                name="o200k_base",
                pat_str=_O200K_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
            )
    return _encoding


def count_tokens(text: str) -> int:
    """Tokens of C{text} in o200k_base (bytes/4, rounded up, without tiktoken)."""
    if not text:
        return 0
    enc = _encoding if _encoding is not None else _load_encoding()
    if enc is False:
        return (len(text.encode("utf-8", "replace")) + 3) // 4
    return len(enc.encode_ordinary(text))


def _content_text(content: object) -> tuple[str, bool]:
    """A message's text, and whether it held parts that are not counted (images, audio)."""
    if isinstance(content, str):
        return content, False
    if not isinstance(content, list):
        return "", content is not None
    texts: list[str] = []
    skipped = False
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            skipped = True
    return "".join(texts), skipped


# How gpt-4o frames function definitions in the prompt, as OpenAI's cookbook
# measured it ("How to count tokens with tiktoken", section 7).
_FUNC_INIT, _PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 7, 3, 3, -3, 3, 12


def _tools_tokens(tools: list[Any]) -> int:
    """Prompt tokens of a C{tools} list of functions; other tools as their JSON."""
    total = 0
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            total += count_tokens(json.dumps(tool, ensure_ascii=False))
            continue
        total += _FUNC_INIT
        desc = str(fn.get("description") or "").removesuffix(".")
        total += count_tokens(f"{fn.get('name', '')}:{desc}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            total += _PROP_INIT
            for key, prop in props.items():
                total += _PROP_KEY
                prop = prop if isinstance(prop, dict) else {}
                enum = prop.get("enum")
                if isinstance(enum, list):
                    total += _ENUM_INIT
                    for item in enum:
                        total += _ENUM_ITEM + count_tokens(str(item))
                pdesc = str(prop.get("description") or "").removesuffix(".")
                total += count_tokens(f"{key}:{prop.get('type', '')}:{pdesc}")
    return total + _FUNC_END


def prompt_tokens(request: object, draft: UsageDraft | None = None) -> int | None:
    """Prompt tokens of a chat or completions request body (parsed JSON), or None."""
    if not isinstance(request, dict):
        return None
    messages = request.get("messages")
    if isinstance(messages, list):
        total = _REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE
            for key, value in message.items():
                if key == "content":
                    text, skipped = _content_text(value)
                    total += count_tokens(text)
                    if skipped and draft is not None:
                        draft.flag("estimate_skipped_media")
                elif key == "tool_calls" and value:
                    total += count_tokens(json.dumps(value, ensure_ascii=False))
                elif isinstance(value, str):
                    total += count_tokens(value)
                    if key == "name":
                        total += _PER_NAME
        tools = request.get("tools")
        if isinstance(tools, list) and tools:
            total += _tools_tokens(tools)
        return total
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return sum(count_tokens(p) for p in prompt)
    return None


def _delta_text(chunk: dict[str, Any]) -> Iterable[str]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # legacy completions
            yield choice["text"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for key in ("content", "refusal", "reasoning_content"):
            if isinstance(delta.get(key), str):
                yield delta[key]
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    for key in ("name", "arguments"):
                        if isinstance(fn.get(key), str):
                            yield fn[key]


def streamed_text(call: Call) -> str | None:
    """The text a chat or completions stream carried, or None when the
    stream's middle was not kept (the proxy keeps a bounded copy)."""
    if call.body_truncated:
        return None
    parts: list[str] = []
    for i, ev in enumerate(call.event_stream().head()):
        if i >= _MAX_EVENTS:
            return None
        if ev.data == b"[DONE]" or b'"choices"' not in ev.data:
            continue
        try:
            chunk = loads(ev.data)
        except BodyError:
            continue
        if isinstance(chunk, dict):
            parts.extend(_delta_text(chunk))
    return "".join(parts)


def estimate_stream_usage(call: Call, draft: UsageDraft, reason: str) -> None:
    """Fill C{draft} with estimated C{input_tokens} and C{output_tokens} for a
    stream that reported none; C{reason} goes into C{price_ref} (see
    L{parsers._analyse}). Leaves the draft alone when nothing can be counted."""
    request = call.request_json()
    prompt = prompt_tokens(request, draft)
    text = streamed_text(call)
    if prompt is None and text is None:
        return
    if prompt is not None:
        draft.estimate("input_tokens", prompt)
    else:
        draft.flag("estimate_without_prompt")
    if text is not None:
        draft.estimate("output_tokens", count_tokens(text))
    else:
        draft.flag("estimate_without_completion")
    draft.details["estimate_reason"] = reason
