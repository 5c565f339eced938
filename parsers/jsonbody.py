"""JSON decoding that turns every way a body can be bad into one exception type.

C{json.loads} raises C{RecursionError} on deep nesting, C{ValueError} on
5,000-digit integers, and accepts C{NaN}/C{Infinity}; here all of those
become L{BodyError}, and non-finite constants are refused.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BodyError", "loads", "loads_object", "raw_decode_prefix"]


class BodyError(Exception):
    """A body that could not be read as the JSON it claims to be."""


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"non-finite number {name}")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def loads(data: bytes | str) -> Any:
    """Parse JSON text (bytes in UTF-8/16/32, BOM allowed); raise L{BodyError} on any fault."""
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
