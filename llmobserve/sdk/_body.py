"""Keeping a one-shot request body replayable until the proxy has accepted it.

A streamed upload (a generator) can be sent only once. When the SDK sends
it to a target whose policy the proxy has not yet shown to admit, it keeps
a bounded copy of what went out, so that a 403 policy refusal (nothing was
sent upstream) can be followed by the same bytes sent direct.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

__all__ = ["MAX_REPLAY_BYTES", "BodyNotReplayable", "BodyRecord"]

#: The largest streamed body kept for a replay (bytes).
MAX_REPLAY_BYTES = 32 * 1024 * 1024


class BodyNotReplayable(RuntimeError):
    """The proxy refused a target after a one-shot body larger than the replay bound went out."""


class BodyRecord:
    """A bounded copy of the chunks a body produced while it was being sent."""

    __slots__ = ("_chunks", "_size", "complete", "overflowed")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.complete = False
        self.overflowed = False

    def _keep(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        self._size += len(chunk)
        if self._size > MAX_REPLAY_BYTES:
            self.overflowed = True
            self._chunks.clear()
        else:
            self._chunks.append(bytes(chunk))

    def sync(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass C{chunks} through, keeping a copy."""
        for chunk in chunks:
            self._keep(chunk)
            yield chunk
        self.complete = True

    async def async_(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """Pass async C{chunks} through, keeping a copy."""
        async for chunk in chunks:
            self._keep(chunk)
            yield chunk
        self.complete = True

    def replay(self) -> list[bytes]:
        """The recorded chunks, or L{BodyNotReplayable} if they were not all kept."""
        if self.overflowed or not self.complete:
            raise BodyNotReplayable(
                "llmobserve: the proxy refused this target by policy after a streamed body "
                f"larger than {MAX_REPLAY_BYTES} bytes (or an unfinished one) went to it; "
                "the call cannot be replayed direct. Later calls to this host go direct. "
                "Add the host to exclude_hosts to skip the proxy for it from the start."
            )
        return self._chunks
