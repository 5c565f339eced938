"""Content-coding removal with an output cap (decompression bombs stop at the cap).

Only what the parser reads is decoded; the client always gets the wire
bytes untouched. At most two codings are undone; longer chains are refused.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import brotli

__all__ = ["DEFAULT_DECODED_CAP", "DecodedBody", "decode_body"]

#: The most decoded bytes any parser will look at (per body).
DEFAULT_DECODED_CAP = 16 * 1024 * 1024
_MAX_CODINGS = 2
_STEP = 64 * 1024


@dataclass(frozen=True)
class DecodedBody:
    """The decoded bytes, whether the cap cut them, and why decoding failed (if it did)."""

    data: bytes
    truncated: bool = False
    error: str | None = None


def decode_body(
    body: bytes, content_encoding: str | None, cap: int = DEFAULT_DECODED_CAP
) -> DecodedBody:
    """Undo C{content_encoding} (gzip, x-gzip, deflate, br, identity) on C{body}.

    Never raises. A body larger than C{cap} after decoding is cut at C{cap}
    and marked truncated; an input that is itself incomplete decodes as far
    as it goes (a truncated stream still yields its usage).
    """
    if not content_encoding:  # the usual case: nothing to undo
        return DecodedBody(body[:cap], truncated=True) if len(body) > cap else DecodedBody(body)
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        if len(body) > cap:
            return DecodedBody(body[:cap], truncated=True)
        return DecodedBody(body)
    if len(codings) > _MAX_CODINGS:
        return DecodedBody(b"", error=f"refused {len(codings)} content codings")
    data = body
    truncated = False
    # Codings are listed in the order applied: undo them last first.
    for coding in reversed(codings):
        try:
            data, cut, error = _decode_one(data, coding, cap)
        except Exception as exc:  # any codec failure becomes a recorded error
            return DecodedBody(b"", error=f"{coding} decoding failed: {type(exc).__name__}")
        truncated = truncated or cut
        if error is not None:
            return DecodedBody(data, truncated=truncated, error=error)
    return DecodedBody(data, truncated=truncated)


def _decode_one(data: bytes, coding: str, cap: int) -> tuple[bytes, bool, str | None]:
    if coding in ("gzip", "x-gzip"):
        return _zlib(data, zlib.MAX_WBITS | 16, cap, coding)
    if coding == "deflate":
        # RFC 9110 says zlib-wrapped; some servers send raw deflate.
        if data[:1] and (data[0] & 0x0F) == 8 and int.from_bytes(data[:2], "big") % 31 == 0:
            return _zlib(data, zlib.MAX_WBITS, cap, coding)
        return _zlib(data, -zlib.MAX_WBITS, cap, coding)
    if coding == "br":
        return _brotli(data, cap)
    return data, False, f"unsupported content coding {coding!r}"


def _zlib(data: bytes, wbits: int, cap: int, coding: str) -> tuple[bytes, bool, str | None]:
    decoder = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    try:
        while pending and len(out) < cap:
            out += decoder.decompress(pending, min(_STEP, cap - len(out)))
            pending = decoder.unconsumed_tail
            if decoder.eof:
                break
        if len(out) >= cap and (pending or not decoder.eof):
            return _bytes(out, cap), True, None
        if not decoder.eof:
            return bytes(out), False, f"{coding} stream incomplete"
    except zlib.error as exc:
        return bytes(out), False, f"{coding} error: {str(exc)[:80]}"
    return bytes(out), False, None


def _brotli(data: bytes, cap: int) -> tuple[bytes, bool, str | None]:
    decoder = brotli.Decompressor()
    if not hasattr(decoder, "can_accept_more_data"):  # pragma: no cover - brotli < 1.2
        return b"", False, "br: installed brotli cannot bound its output"
    out = bytearray()
    try:
        out += decoder.process(data, output_buffer_limit=_STEP)
        while len(out) < cap and not decoder.is_finished() and not decoder.can_accept_more_data():
            out += decoder.process(b"", output_buffer_limit=_STEP)
    except brotli.error as exc:
        cut = len(out) > cap
        return _bytes(out, cap), cut, f"br error: {str(exc)[:80]}"
    if len(out) >= cap and not decoder.is_finished():
        return _bytes(out, cap), True, None
    if not decoder.is_finished():
        return bytes(out), False, "br stream incomplete"
    cut = len(out) > cap
    return _bytes(out, cap), cut, None


def _bytes(out: bytearray, cap: int) -> bytes:
    """C{bytes(out[:cap])} with one copy of up to C{cap} bytes, not two (the
    slice is a copy of its own): a 16 MiB cap held ~48 MiB at the peak."""
    del out[cap:]
    return bytes(out)
