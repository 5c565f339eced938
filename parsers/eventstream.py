"""A bounded reader for AWS event-stream frames (Bedrock, Transcribe streaming).

Frame: total length, headers length, prelude CRC (4 bytes each), headers,
payload, message CRC. CRCs are checked; a bad or partial frame ends the read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["EventFrame", "read_frames"]

_MAX_FRAME = 16 << 20


@dataclass(frozen=True, slots=True)
class EventFrame:
    """One frame: its string headers (others skipped) and its payload."""

    headers: dict[str, str]
    payload: bytes


def read_frames(data: bytes, limit: int = 100_000) -> tuple[list[EventFrame], str | None]:
    """Every complete frame in C{data}, and why reading stopped early (or None)."""
    frames: list[EventFrame] = []
    pos = 0
    size = len(data)
    while pos + 16 <= size and len(frames) < limit:
        total = int.from_bytes(data[pos : pos + 4], "big")
        hlen = int.from_bytes(data[pos + 4 : pos + 8], "big")
        if total < 16 or total > _MAX_FRAME or hlen > total - 16:
            return frames, "bad event-stream frame length"
        if zlib.crc32(data[pos : pos + 8]) != int.from_bytes(data[pos + 8 : pos + 12], "big"):
            return frames, "bad event-stream prelude CRC"
        if pos + total > size:
            return frames, "event-stream frame cut short"
        end = pos + total
        if zlib.crc32(data[pos : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return frames, "bad event-stream message CRC"
        headers = _headers(data[pos + 12 : pos + 12 + hlen])
        if headers is None:
            return frames, "bad event-stream headers"
        frames.append(EventFrame(headers, data[pos + 12 + hlen : end - 4]))
        pos = end
    if pos < size and len(frames) < limit:
        return frames, "event-stream frame cut short"
    return frames, None


_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _headers(raw: bytes) -> dict[str, str] | None:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        nlen = raw[pos]
        name = raw[pos + 1 : pos + 1 + nlen].decode("utf-8", "replace")
        pos += 1 + nlen
        if pos >= len(raw):
            return None
        kind = raw[pos]
        pos += 1
        if kind in (6, 7):
            vlen = int.from_bytes(raw[pos : pos + 2], "big")
            value = raw[pos + 2 : pos + 2 + vlen]
            pos += 2 + vlen
            if kind == 7:
                out[name] = value.decode("utf-8", "replace")
        elif kind in _FIXED:
            pos += _FIXED[kind]
        else:
            return None
        if pos > len(raw):
            return None
    return out
