"""The link frame codec (docs/LINK.md framing): encoder, incremental decoder."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmobserve.events._codec import (
    MAGIC,
    MAX_FRAME_SIZE,
    FrameDecoder,
    FrameError,
    decode_body,
    encode_frame,
)

MESSAGES: list[dict[str, Any]] = [
    {"t": "hello", "proxy_id": "p-1", "version": 1},
    {"t": "batch", "seq": 7, "events": [{"id": "e1", "cost_usd": None, "usage": {"a": 1}}]},
    {"t": "ack", "seq": 7},
    {"t": "ping", "ts": 1.5},
    {"t": "batch", "seq": 8, "events": [{"id": "é", "raw": b"\x00\xff"}]},
]


def _stream() -> bytes:
    return b"".join(encode_frame(m) for m in MESSAGES)


def test_magic_is_the_documented_five_bytes() -> None:
    """The link magic is exactly C{LLMO\\x01}."""
    assert MAGIC == b"LLMO\x01"


def test_encode_frame_layout() -> None:
    """A frame is a 4-byte big-endian length then one msgpack map."""
    frame = encode_frame({"t": "ack", "seq": 3})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == {"t": "ack", "seq": 3}


def test_round_trip_whole_stream() -> None:
    """Feeding a whole stream at once yields every message, in order."""
    assert FrameDecoder().feed(_stream()) == MESSAGES


def test_every_split_offset() -> None:
    """Splitting the stream in two at every offset yields the same messages."""
    data = _stream()
    for i in range(len(data) + 1):
        d = FrameDecoder()
        got = d.feed(data[:i]) + d.feed(data[i:])
        assert got == MESSAGES, i
        assert d.buffered == 0


def test_byte_at_a_time() -> None:
    """One byte per feed still yields every message, and nothing early."""
    data = _stream()
    d = FrameDecoder()
    got: list[dict[str, Any]] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == MESSAGES


@settings(max_examples=60, deadline=None)
@given(
    msgs=st.lists(
        st.fixed_dictionaries(
            {"t": st.text(min_size=1, max_size=5)},
            optional={
                "seq": st.integers(min_value=0, max_value=2**63),
                "x": st.binary(max_size=40),
                "y": st.lists(st.text(max_size=8), max_size=4),
            },
        ),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_random_splits(msgs: list[dict[str, Any]], cuts: list[int]) -> None:
    """Any splitting of any stream of messages decodes to the same messages."""
    data = b"".join(encode_frame(m) for m in msgs)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    d = FrameDecoder()
    got: list[dict[str, Any]] = []
    for a, b in itertools.pairwise(points):
        got += d.feed(data[a:b])
    assert got == msgs


def test_oversized_length_refused_before_body() -> None:
    """A length over the maximum is refused from the header alone."""
    d = FrameDecoder(max_frame_size=100)
    with pytest.raises(FrameError, match="exceeds"):
        d.feed(struct.pack(">I", 101))
    assert d.buffered == 0


def test_default_maximum_is_16_mib() -> None:
    """The default limit is LINK.md's 16 MiB: one more byte is refused."""
    assert MAX_FRAME_SIZE == 16 * 1024 * 1024
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_SIZE + 1))
    # exactly the maximum is only a promise of more bytes, not an error
    assert FrameDecoder().feed(struct.pack(">I", MAX_FRAME_SIZE)) == []


def test_buffer_bounded_by_frame_size() -> None:
    """The decoder never buffers more than header plus one frame body."""
    d = FrameDecoder(max_frame_size=64)
    d.feed(struct.pack(">I", 64) + b"\x00" * 63)
    assert d.buffered == 63


def test_encode_refuses_oversized_and_missing_t() -> None:
    """The encoder refuses what the decoder would refuse."""
    with pytest.raises(FrameError):
        encode_frame({"t": "batch", "blob": b"x" * 200}, max_frame_size=100)
    with pytest.raises(FrameError):
        encode_frame({"seq": 1})
    with pytest.raises(FrameError):
        encode_frame({"t": 5})


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x91\x01",  # a list, not a map
        msgpack.packb({"seq": 1}),  # no t
        msgpack.packb({"t": 1}),  # t not a string
        msgpack.packb({"t": b"hello"}, use_bin_type=True),  # t is bytes
        msgpack.packb({"t": "x"}) + b"\x00",  # trailing data
        msgpack.packb({"t": "x", "e": msgpack.ExtType(5, b"ab")}),  # ext type
        b"\x82\xa1t",  # truncated map
        b"",  # empty body
        b"\x91" * 5000 + b"\x80",  # deep nesting
        b"\xa2\xff\xfe",  # invalid UTF-8 string
    ],
)
def test_garbage_bodies_are_protocol_errors(body: bytes) -> None:
    """Every kind of garbage body is a FrameError, never another exception."""
    with pytest.raises(FrameError):
        decode_body(body)
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(struct.pack(">I", len(body)) + body)


def test_failed_decoder_stays_failed() -> None:
    """After a protocol error the decoder refuses all further input."""
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(struct.pack(">I", 1) + b"\xc1")
    with pytest.raises(FrameError):
        d.feed(encode_frame({"t": "ping", "ts": 1.0}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    """Random input yields messages or a FrameError, nothing else."""
    d = FrameDecoder(max_frame_size=1024)
    try:
        for m in d.feed(data):
            assert isinstance(m["t"], str)
    except FrameError:
        pass
