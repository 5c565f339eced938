"""The embedded writer: batch decoding and commit pacing (real reactor and thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from events.eventkit import FakeStore, eventually
from twisted.internet import reactor

from llmobserve.events._embedded import EmbeddedWriter, _unpack
from llmobserve.events._outbox import Outbox

pytestmark = pytest.mark.timeout(30)


def _pack(event: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(event, use_bin_type=True)
    return packed


@pytest.mark.parametrize("n", [1, 15, 16, 300, 70_000])
def test_unpack_a_batch_in_one_call(n: int) -> None:
    """Records decode to their events in order, whatever the array header size."""
    records = [(i, _pack({"id": f"e{i}", "n": i, "b": b"\x00"})) for i in range(n)]
    events = _unpack(records)
    assert len(events) == n
    assert events[0] == {"id": "e0", "n": 0, "b": b"\x00"}
    assert events[-1]["id"] == f"e{n - 1}"


def test_unpack_a_bad_record_raises_as_before() -> None:
    """A payload that is not one msgpack object still fails the batch (and is retried)."""
    records = [(0, _pack({"id": "a"})), (1, _pack({"id": "b"})[:-1])]
    with pytest.raises(ValueError):
        _unpack(records)


@pytest_twisted.ensureDeferred
async def test_events_in_a_burst_share_commits(tmp_path: Path) -> None:
    """While events keep coming, commits are at most every min_interval; a lone one goes at once."""
    stores: list[FakeStore] = []

    def factory(path: str) -> FakeStore:
        stores.append(FakeStore(path))
        return stores[-1]

    outbox = Outbox(acked_seq=0, last_seq=0)
    writer = EmbeddedWriter(
        reactor, outbox, str(tmp_path / "x"), store_factory=factory, min_interval=0.2
    )
    writer.startService()
    try:
        await eventually(lambda: writer.connected)
        outbox.offer(1, _pack({"id": "first"}))  # after a quiet spell: written at once
        writer.pump()
        await eventually(lambda: outbox.acked_seq == 1, timeout=0.15)
        for seq in range(2, 102):
            outbox.offer(seq, _pack({"id": f"e{seq}"}))
            writer.pump()
        await eventually(lambda: outbox.acked_seq == 101)
        assert len(stores[0].events) == 101
        assert stores[0].inserts <= 3
    finally:
        await writer.stopService()
    assert stores[0].closed
