"""The bounded body copy handed to the parsers."""

from llmobserve.proxy._bodytap import BodyTap


def test_small_body_is_kept_whole() -> None:
    tap = BodyTap(100, 50)
    tap.add(b"hello ")
    tap.add(b"world")
    assert tap.value() == b"hello world"
    assert not tap.truncated


def test_long_body_keeps_head_and_tail_from_a_line_break() -> None:
    """SSE usage sits at the end of a stream: the tail survives, cut at a line."""
    tap = BodyTap(10, 64)
    tap.add(b"data: 0123456789\n\n")
    for i in range(100):
        tap.add(b"data: %d\n\n" % i)
    tap.add(b'data: {"usage": 1}\n\n')
    value = tap.value()
    assert tap.truncated
    assert value.startswith(b"data: 0123\n\n")
    assert value.endswith(b'data: {"usage": 1}\n\n')
    assert len(value) <= 10 + 2 + 64


def test_a_tail_without_a_line_break_is_kept_whole() -> None:
    """Compact JSON: the usage at the end of a long response survives."""
    tap = BodyTap(10, 32)
    tap.add(b'{"data":[' + b"0," * 100)
    tap.add(b'0],"usage":{"total_tokens":7}}')
    value = tap.value()
    assert value.startswith(b'{"data":[0\n\n')
    assert value.endswith(b'"usage":{"total_tokens":7}}')
    assert len(value) == 10 + 2 + 32


def test_memory_is_bounded_whatever_the_body_size() -> None:
    tap = BodyTap(1024, 1024)
    for _ in range(10_000):
        tap.add(b"x" * 1000)
    assert len(tap.value()) <= 1024 + 2 + 1024


def test_head_only_tap_remembers_it_was_cut() -> None:
    tap = BodyTap(4)
    tap.add(b"abcdef")
    assert tap.value() == b"abcd"
    assert tap.truncated
