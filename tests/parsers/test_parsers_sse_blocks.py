"""EventStream's one-line shortcut decodes each block as a decoder of its own would.

Most events of a stream are a single C{data:} line; L{EventStream} returns
those without building an L{SSEDecoder}. For any body and any size limits,
its events, drop count and cut event are those of the plain per-block
decoding it short-cuts.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from parsers.sse import EventStream, SSEDecoder, SSEEvent


class PlainEventStream(EventStream):
    """Every block through a decoder of its own (no shortcut)."""

    def _decode(self, block: bytes, first: bool, final: bool) -> list[SSEEvent]:
        decoder = SSEDecoder(*self._limits)
        if not first:
            decoder._at_start = False
        events = decoder.feed(block)
        if final:
            events += decoder.close()
            if decoder.unterminated and events:
                self.cut = events[-1]
        else:
            events += decoder.feed(b"\n\n")
        self.dropped += decoder.dropped
        return events


_lines = st.sampled_from(
    [b"data: {}", b"data: [DONE]", b"data:x", b"data: ", b"event: ping", b"id: 7", b": hi", b""]
) | st.binary(max_size=30).map(lambda b: b"data: " + b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(_lines, min_size=1, max_size=3), max_size=6),
    st.sampled_from([b"", b"\n", b"\n\n"]),
    st.booleans(),
    st.integers(4, 40),
    st.integers(4, 60),
)
def test_shortcut_gives_the_plain_events(
    events: list[list[bytes]], end: bytes, bom: bool, max_line: int, max_event: int
) -> None:
    body = (b"\xef\xbb\xbf" if bom else b"") + b"\n\n".join(b"\n".join(e) for e in events) + end
    for reader in ("head", "tail"):
        fast = EventStream(body, max_line, max_event)
        plain = PlainEventStream(body, max_line, max_event)
        assert list(getattr(fast, reader)()) == list(getattr(plain, reader)())
        assert fast.dropped == plain.dropped
        assert fast.cut == plain.cut
