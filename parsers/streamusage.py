"""Usage for OpenAI-style streams: the request rewrite and the response filter.

Sans-I/O halves of C{--stream-usage PROVIDER=inject}: L{inject_include_usage}
adds C{"stream_options": {"include_usage": true}} to a streamed
chat/completions (or completions) request body, and L{UsageChunkFilter}
takes the extra final usage event (C{"choices": []} with C{usage}) back out
of the stream, incrementally, so that the client receives the bytes it
would have received had nobody asked.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from .jsonbody import BodyError, loads

__all__ = [
    "STREAM_USAGE_MODES",
    "UsageChunkFilter",
    "inject_include_usage",
    "is_usage_only_event",
    "usage_injectable_path",
]

#: The values C{--stream-usage PROVIDER=MODE} takes.
STREAM_USAGE_MODES: Final = ("inject", "estimate", "off")

_PATH_SUFFIXES: Final = ("/chat/completions", "/completions")
_INSERT: Final = b'"stream_options":{"include_usage":true},'
_BLANK_LINE: Final = re.compile(rb"\n\r?\n")
_CHOICES: Final = b'"choices"'
_DATA: Final = b"data:"
_WS: Final = b" \t\r\n"


def usage_injectable_path(path: str) -> bool:
    """True for the paths whose streams take C{stream_options.include_usage}."""
    return path.rstrip("/").endswith(_PATH_SUFFIXES)


def inject_include_usage(body: bytes) -> bytes | None:
    """The request body with C{stream_options.include_usage} set, or None to
    send it unchanged: not a JSON object, not C{"stream": true}, or it asked
    for usage already.

    When the body has no C{stream_options}, the field is inserted right
    after the opening brace and every other byte stays as the client wrote
    it; an existing C{stream_options} without C{include_usage: true} is
    rewritten by re-encoding the object (compact, non-ASCII kept).
    """
    if b'"stream"' not in body:
        return None  # most bodies: no JSON parse
    try:
        obj: Any = loads(body)
    except BodyError:
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options", None)
    if options is None and "stream_options" not in obj:
        start = len(body) - len(body.lstrip(_WS))
        return body[: start + 1] + _INSERT + body[start + 1 :]
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    kept = options if isinstance(options, dict) else {}
    obj["stream_options"] = {**kept, "include_usage": True}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def is_usage_only_event(event: bytes) -> bool:
    """True for one complete SSE event whose data is a chunk with
    C{"choices": []} and a C{usage} object: the chunk C{include_usage} adds."""
    lines: list[bytes] = []
    for line in event.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(_DATA):
            lines.append(line[5:].removeprefix(b" "))
        elif line:
            return False  # an event: or id: line, a comment: not the plain usage chunk
    if not lines:
        return False
    try:
        obj = loads(b"\n".join(lines))
    except BodyError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _may_be_usage_event(held: bytes) -> bool:
    """Whether the start of an event could still be the usage-only event."""
    if held[:5] != _DATA[: len(held[:5])]:
        return False
    at = held.find(_CHOICES)
    if at < 0:
        return True
    rest = held[at + len(_CHOICES) :].lstrip(_WS)
    if not rest:
        return True
    if rest[:1] != b":":
        return False
    rest = rest[1:].lstrip(_WS)
    if not rest:
        return True
    if rest[:1] != b"[":
        return False
    rest = rest[1:].lstrip(_WS)
    return not rest or rest[:1] == b"]"


class UsageChunkFilter:
    """Removes the usage-only event from an SSE stream, bytes in any pieces.

    Every event but one passes at once: an event is held back only while
    its start could still be the usage chunk (C{data:} up to its
    C{"choices": []}), at most C{max_held} bytes, and dropped when it
    completes as one; everything else is passed on in the pieces it came in.
    """

    __slots__ = ("_held", "_max_held", "_passing", "_tail", "removed")

    def __init__(self, max_held: int = 64 * 1024) -> None:
        self._max_held = max_held
        self._held = b""  # the current event's bytes, withheld
        self._passing = False  # the current event is known not to be the usage chunk
        self._tail = b""  # the current event's last two bytes (a blank line split across pieces)
        #: How many usage-only events were removed.
        self.removed = 0

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the stream; return what to pass on now."""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        while pos < size:
            tail = self._tail
            if tail:
                found = _BLANK_LINE.search(tail + data[pos : pos + 2])
                if found is not None:
                    end = pos + found.end() - len(tail)
                else:
                    found = _BLANK_LINE.search(data, pos)
                    end = found.end() if found is not None else -1
            else:
                found = _BLANK_LINE.search(data, pos)
                end = found.end() if found is not None else -1
            if end < 0:
                self._part(data[pos:] if pos else data, out)
                break
            self._whole(data[pos:end], out)
            pos = end
        return b"".join(out)

    def close(self) -> bytes:
        """The stream ended: whatever is still held (an unterminated event)."""
        held, self._held = self._held, b""
        self._passing = False
        self._tail = b""
        return held

    def _part(self, piece: bytes, out: list[bytes]) -> None:
        self._tail = (self._tail + piece)[-2:]
        if self._passing:
            out.append(piece)
            return
        held = self._held + piece
        if _may_be_usage_event(held) and len(held) <= self._max_held:
            self._held = held
            return
        self._held = b""
        self._passing = True
        out.append(held)

    def _whole(self, piece: bytes, out: list[bytes]) -> None:
        passing, held = self._passing, self._held
        self._held, self._passing, self._tail = b"", False, b""
        if passing:
            out.append(piece)
            return
        event = held + piece if held else piece
        if is_usage_only_event(event):
            self.removed += 1
            return
        out.append(event)
