"""Frames of the collector link (docs/LINK.md), sans-I/O.

A frame is a 4-byte big-endian length followed by that many bytes of one
msgpack map (C{use_bin_type=True}, C{raw=False}, no ext types) that carries a
string C{t}. L{encode_frame} builds one; L{FrameDecoder} takes bytes split
anywhere and returns whole messages, with its buffer bounded by the maximum
frame size. Both the proxy and the collector use this module; it imports
neither Twisted nor anything that touches a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

__all__ = [
    "MAGIC",
    "MAX_EVENT_DEPTH",
    "MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "nested_deeper_than",
]

#: The first five bytes a proxy sends on a link connection.
MAGIC: Final = b"LLMO\x01"

#: The link protocol version carried in C{hello} and C{welcome}.
PROTOCOL_VERSION: Final = 1

#: The largest frame body either side accepts (16 MiB).
MAX_FRAME_SIZE: Final = 16 * 1024 * 1024

#: How deeply an event may nest maps and lists (the event map itself is level
#: 1). msgpack decodes up to about 1,000 levels; code that walks a value
#: recursively (JSON encoders, the store's conversions) fails well before,
#: so a collector stores a deeper event as a rejected record (docs/LINK.md).
MAX_EVENT_DEPTH: Final = 64

_LENGTH = struct.Struct(">I")
_HEADER_SIZE: Final = _LENGTH.size


class FrameError(Exception):
    """A protocol error: the receiver must close the connection."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack ext type {code} is not allowed on the link")


def encode_frame(message: Mapping[str, Any], max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Encode one link message as a frame: length prefix plus msgpack map.

    @param message: a map with a string C{t}.
    @param max_frame_size: the largest body allowed.
    @raise FrameError: the message has no string C{t} or encodes to more
        than C{max_frame_size} bytes.
    @raise TypeError: the message holds a value msgpack cannot encode.
    """
    if not isinstance(message.get("t"), str):
        raise FrameError("a link message needs a string 't'")
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame_size:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {max_frame_size}-byte maximum")
    return _LENGTH.pack(len(body)) + body


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether C{value} nests maps and lists more than C{limit} levels deep.

    Iterative (a recursive walk would itself fail on what it looks for); a
    scalar is level 0, C{{}} and C{[]} level 1.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop = stack.pop
    push = stack.append
    while stack:
        item, depth = pop()
        t = type(item)
        if t is dict or isinstance(item, Mapping):
            children: Any = item.values()
        elif t is list or t is tuple:
            children = item
        else:
            continue
        if depth > limit:
            return True
        for child in children:
            if isinstance(child, dict | list | tuple | Mapping):
                push((child, depth + 1))
    return False


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a message map.

    @raise FrameError: the body is not exactly one msgpack map with a string
        C{t}, or uses ext types.
    """
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except FrameError:
        raise
    except Exception as e:  # msgpack raises many kinds: all mean garbage
        raise FrameError(f"undecodable frame body: {type(e).__name__}: {e}") from None
    if not isinstance(message, dict):
        raise FrameError(f"frame body is a {type(message).__name__}, not a map")
    if not isinstance(message.get("t"), str):
        raise FrameError("frame map has no string 't'")
    return message


class FrameDecoder:
    """Incremental frame decoder fed arbitrary splits of the byte stream.

    Memory is bounded: the buffer never holds more than one frame header plus
    C{max_frame_size} bytes of body before it is decoded or refused. After a
    L{FrameError} the decoder stays failed (the connection is to be closed).
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """How many received bytes wait for the rest of their frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Take the next bytes of the stream; return every message now complete.

        @raise FrameError: oversized length, garbage body, or a map without a
            string C{t}. Messages completed before the bad frame in the same
            call are lost with it: the link is closed and the peer resends.
        """
        if self._failed is not None:
            raise self._failed
        buf = self._buffer
        buf += data
        out: list[dict[str, Any]] = []
        try:
            while True:
                if self._need is None:
                    if len(buf) < _HEADER_SIZE:
                        break
                    (length,) = _LENGTH.unpack_from(buf)
                    if length > self._max:
                        raise FrameError(
                            f"frame length {length} exceeds the {self._max}-byte maximum"
                        )
                    del buf[:_HEADER_SIZE]
                    self._need = length
                if len(buf) < self._need:
                    break
                body = bytes(buf[: self._need])
                del buf[: self._need]
                self._need = None
                out.append(decode_body(body))
        except FrameError as e:
            self._failed = e
            buf.clear()
            raise
        return out
