"""A bounded copy of a body, for the parsers: the head, and for long bodies the tail."""

from __future__ import annotations

from collections import deque

__all__ = ["BodyTap"]


class BodyTap:
    """Keeps the first C{head_limit} bytes and, past that, the last C{tail_limit}.

    Chunks are kept by reference (no copy per chunk). A truncated copy is
    the head, a blank line, and the tail from its first line break on: SSE
    usage lives at the end of a stream, and a blank line ends whatever
    event the head was cut in. A tail with no line break (compact JSON,
    where the usage of a long response sits too) is kept whole.
    """

    __slots__ = ("_head", "_head_limit", "_head_size", "_tail", "_tail_limit", "_tail_size")

    def __init__(self, head_limit: int, tail_limit: int = 0) -> None:
        self._head: list[bytes] = []
        self._head_size = 0
        self._head_limit = head_limit
        self._tail: deque[bytes] | None = None  # made when the head is full
        self._tail_size = 0
        self._tail_limit = tail_limit

    def add(self, data: bytes) -> None:
        room = self._head_limit - self._head_size
        if room > 0:
            if len(data) <= room:
                self._head.append(data)
                self._head_size += len(data)
                return
            self._head.append(data[:room])
            self._head_size += room
            data = data[room:]
        if self._tail_limit <= 0:
            self._tail_size = 1  # remember that something was cut
            return
        tail = self._tail
        if tail is None:
            tail = self._tail = deque()
        tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(tail[0]) >= self._tail_limit:
            self._tail_size -= len(tail.popleft())

    @property
    def truncated(self) -> bool:
        return self._tail_size > 0

    def whole(self) -> bytes | None:
        """The body when nothing was cut (None when it was): one call where
        the budget check would make two."""
        if self._tail_size:
            return None
        return b"".join(self._head)

    def value(self) -> bytes:
        """The copy. It is made on the reactor thread, so the head is copied
        once, into the result, and the tail twice at most."""
        if not self._tail:
            return b"".join(self._head)
        tail = b"".join(self._tail)
        start = max(0, len(tail) - self._tail_limit)
        cut = tail.find(b"\n", start)
        begin = cut + 1 if cut >= 0 else start
        return b"".join([*self._head, b"\n\n", memoryview(tail)[begin:]])
