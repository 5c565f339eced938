"""JSON bodies: orjson's fast path gives json's result, or json decides.

orjson parses first; whatever it refuses (or would read differently, like
integers beyond 64 bits, which it turns into floats) goes through C{json}
as before. These pin that the answer, types included, is C{json}'s.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import jsonbody
from parsers.jsonbody import BodyError, loads, loads_object


def _json(data: bytes | str) -> Any:
    if isinstance(data, bytes):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return json.loads(data)


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage": {"prompt_tokens": 18446744073709551616}}',  # 2**64: orjson gives a float
        b'{"n": -9223372036854775809}',  # below int64: orjson gives a float
        b'{"n": 123456789012345678901234567890}',
        b'{"n": 9223372036854775808, "m": 18446744073709551615}',  # fit u64: either parser
        b'{"s": "\\ud800"}',  # a lone surrogate escape: orjson refuses
        b'\xef\xbb\xbf{"a": 1}',  # UTF-8 BOM: orjson refuses
        '{"a": "é"}'.encode("utf-16"),  # UTF-16: orjson refuses
        b'{"x": 1e400}',  # overflows to inf in json; orjson refuses
        b'{"x": 1.5, "y": -0.0, "z": [true, false, null]}',
        '{"a": "\ud800"}',  # a str with a lone surrogate
    ],
)
def test_orjson_fallback_gives_json_result(body: bytes | str) -> None:
    """Bodies orjson refuses or reads differently parse exactly as json parses them."""
    got, want = loads(body), _json(body)
    assert repr(got) == repr(want)  # same values and same types (int stays int)


def test_big_int_counts_stay_ints() -> None:
    """A 65-bit count is an int, as json reads it, not orjson's float."""
    value = loads_object(b'{"usage": {"prompt_tokens": 36893488147419103232}}')
    assert value["usage"]["prompt_tokens"] == 2**65
    assert type(value["usage"]["prompt_tokens"]) is int


@pytest.mark.parametrize(
    "body",
    [b'{"a": NaN}', b'{"a": Infinity}', b"[" * 5000 + b"]" * 5000, b"{", b'"\xff"', b""],
)
def test_refused_bodies_still_raise_body_error(body: bytes) -> None:
    """NaN, deep nesting, truncation, bad UTF-8: BodyError, as before."""
    with pytest.raises(BodyError):
        loads(body)


def test_overflow_check_sees_long_digit_runs_only() -> None:
    assert jsonbody._may_overflow(b'{"a": 1234567890123456789}')
    assert jsonbody._may_overflow('{"a": "1234567890123456789"}')
    assert not jsonbody._may_overflow(b'{"a": 123456789012345678, "b": 1.5e300}')


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_values, st.booleans())
def test_any_json_parses_as_json_parses_it(value: Any, ascii_only: bool) -> None:
    """For any document json can write, loads() returns what json.loads returns."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    got, want = loads(text.encode("utf-8", "surrogatepass")), json.loads(text)
    assert repr(got) == repr(want)
