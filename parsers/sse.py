"""An incremental, bounded Server-Sent Events decoder (WHATWG event-stream rules).

Bytes go in, in chunks split anywhere (mid-line, mid-CRLF, mid-UTF-8);
complete events come out. Lines and events have a maximum size: an
oversized one is dropped and counted, never buffered without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["EventStream", "SSEDecoder", "SSEEvent"]

_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One dispatched event: its type (C{message} by default), data lines joined by LF, last id."""

    event: str
    data: bytes
    id: str | None = None


class SSEDecoder:
    """Feed bytes with L{feed}, finish with L{close}; both return the events completed."""

    def __init__(self, max_line: int = 1 << 20, max_event: int = 8 << 20) -> None:
        self._max_line = max_line
        self._max_event = max_event
        self._buf = b""
        self._at_start = True
        self._skip_lf = False
        self._discarding_line = False
        self._data: list[bytes] = []
        self._size = 0
        self._oversized = False
        self._event = b""
        self._last_id: str | None = None
        #: Lines and events dropped for being over their maximum.
        self.dropped = 0
        #: True when L{close} found an event that had no terminating blank line.
        self.unterminated = False

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Take the next bytes of the stream; return the events they complete."""
        if not data:
            return []
        if self._discarding_line and not self._buf:
            # Still inside an over-long line: drop bytes up to its end, unbuffered.
            ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
            if not ends:
                return []
            data = data[min(ends) :]
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._buf + data if self._buf else data
        if self._at_start:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._buf = buf
                return []
            self._at_start = False
            if buf.startswith(_BOM):
                buf = buf[3:]
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut < 0:
            self._buf = buf
            if len(buf) > self._max_line:
                self._buf = b""
                self._discarding_line = True
                self.dropped += 1
            return []
        complete = buf[: cut + 1]
        self._buf = buf[cut + 1 :]
        if cut == len(buf) - 1 and complete[-1:] == b"\r":
            self._skip_lf = True  # its LF may arrive in the next chunk
        if len(self._buf) > self._max_line:
            self._buf = b""
            self._discarding_line = True
            self.dropped += 1
        if b"\r" in complete or self._data or self._event or self._discarding_line:
            return self._lines(complete.splitlines())
        return self._blocks(complete)

    def _blocks(self, complete: bytes) -> list[SSEEvent]:
        """Fast path for LF-only text starting at an event boundary (the common case):
        whole events are split on blank lines, and the usual one- and two-line
        shapes become events without a line-by-line walk."""
        blocks = complete.split(b"\n\n")
        tail = blocks.pop()
        events: list[SSEEvent] = []
        limit = min(self._max_line, self._max_event)
        last_id = self._last_id
        for block in blocks:
            if len(block) <= limit:
                if block.startswith(b"data: ") and b"\n" not in block:
                    events.append(SSEEvent("message", block[6:], last_id))
                    continue
                if block.startswith(b"event: "):
                    nl = block.find(b"\n")
                    if (
                        nl > 0
                        and block.startswith(b"data: ", nl + 1)
                        and b"\n" not in block[nl + 1 :]
                    ):
                        name = block[7:nl].decode("utf-8", "replace") or "message"
                        events.append(SSEEvent(name, block[nl + 7 :], last_id))
                        continue
            events += self._lines([*block.split(b"\n"), b""])
            last_id = self._last_id
        if tail:
            events += self._lines(tail.splitlines())
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: the last unterminated line counts, and a pending event is
        dispatched (lenient, unlike browsers: a cut stream still yields its usage)."""
        lines = [self._buf] if self._buf else []
        self._buf = b""
        events = self._lines(lines)
        if self._data and not self._oversized:
            self.unterminated = True
            events.append(self._dispatch_event())
        self._data = []
        return events

    def _lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        max_line = self._max_line
        for line in lines:
            if self._discarding_line:
                # The rest of an over-long line: drop it, resume at the next line.
                self._discarding_line = False
                continue
            if not line:
                if self._data:
                    if self._oversized:
                        self._oversized = False
                        self._data = []
                        self._size = 0
                    else:
                        events.append(self._dispatch_event())
                self._event = b""
                continue
            if len(line) > max_line:
                self.dropped += 1
                continue
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                self._size += len(value) + 1
                if self._size > self._max_event:
                    if not self._oversized:
                        self.dropped += 1
                    self._oversized = True
                    self._data = [b""]
                else:
                    self._data.append(value)
                continue
            if line[0] == 0x3A:  # ":" comment
                continue
            colon = line.find(b":")
            if colon < 0:
                name, value = line, b""
            else:
                name, value = line[:colon], line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if name == b"event":
                self._event = value
            elif name == b"id" and b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        return events

    def _dispatch_event(self) -> SSEEvent:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = self._event.decode("utf-8", "replace") if self._event else "message"
        self._data = []
        self._size = 0
        self._event = b""
        return SSEEvent(event, data, self._last_id)


class EventStream:
    """The events of a complete event-stream body, readable from either end.

    Usage sits in the first and last few events of a stream, so most
    parsers read L{head} and L{tail} and never decode the middle. For
    LF-only bodies (the norm) a blank line always ends an event, so events
    are found by searching for LF LF from either end and each is decoded by
    an L{SSEDecoder} of its own: the same events, in the same order, as one
    decoder fed the whole body (a test checks this). Bodies with CR line
    ends are decoded whole.
    """

    def __init__(self, body: bytes, max_line: int = 1 << 20, max_event: int = 8 << 20) -> None:
        self._body = body
        self._limits = (max_line, max_event)
        self._events: list[SSEEvent] | None = None
        #: Lines or events dropped for size, in what was decoded so far.
        self.dropped = 0
        #: The last event when the body ended inside it (it may be partial), else None.
        self.cut: SSEEvent | None = None
        self._lazy = b"\r" not in body
        if not self._lazy:
            decoder = SSEDecoder(*self._limits)
            self._events = decoder.feed(body) + decoder.close()
            self.dropped = decoder.dropped
            if decoder.unterminated and self._events:
                self.cut = self._events[-1]

    def _decode(self, block: bytes, first: bool, final: bool) -> list[SSEEvent]:
        if not block and not final:
            return []  # between the last event's blank line and the end: nothing
        if (
            not final
            and block.startswith(b"data: ")
            and b"\n" not in block
            and len(block) <= min(self._limits)
        ):
            # one data line, the usual event: what the decoder's fast path
            # would return for it, without building a decoder
            return [SSEEvent("message", block[6:], None)]
        decoder = SSEDecoder(*self._limits)
        if not first:
            decoder._at_start = False  # a BOM is only special at the very start
        events = decoder.feed(block)
        if final:
            events += decoder.close()
            if decoder.unterminated and events:
                self.cut = events[-1]
        else:
            events += decoder.feed(b"\n\n")
        self.dropped += decoder.dropped
        return events

    def head(self) -> Iterator[SSEEvent]:
        """Events from the first on."""
        if self._events is not None:
            yield from self._events
            return
        body = self._body
        start = 0
        size = len(body)
        while start < size:
            end = body.find(b"\n\n", start)
            final = end < 0
            block = body[start:] if final else body[start:end]
            yield from self._decode(block, start == 0, final)
            if final:
                return
            start = end + 2

    def tail(self) -> Iterator[SSEEvent]:
        """Events from the last back to the first."""
        if self._events is not None:
            yield from reversed(self._events)
            return
        body = self._body
        end = len(body)
        final = not body.endswith(b"\n\n")
        while end > 0:
            start = body.rfind(b"\n\n", 0, end)
            block = body[start + 2 if start >= 0 else 0 : end]
            yield from reversed(self._decode(block, start < 0, final))
            final = False
            if start < 0:
                return
            end = start
