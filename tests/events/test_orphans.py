"""Adopting orphaned sub-spools (issue 13 item 9), in one process: a spool
open here stands for a live process (its flock is per open file)."""

from __future__ import annotations

from pathlib import Path

from llmobserve.events._orphans import OrphanSpools, sibling_spools
from llmobserve.events._spool import EventSpool


def _spool_with(directory: Path, n: int) -> EventSpool:
    spool = EventSpool(directory, max_bytes=10_000_000, segment_bytes=4096)
    for i in range(n):
        spool.append(f"{directory.name}-{i}".encode())
    return spool


def test_only_unheld_siblings_with_a_backlog_are_adopted_and_moved_in_order(
    tmp_path: Path,
) -> None:
    """p1 (nobody holds it, 2,500 waiting) is taken and moved batch by batch
    into the own spool, in order, then released with nothing waiting; p2 (a
    live holder) and p3 (nothing waiting) are left alone."""
    base = tmp_path / "spool"
    own = EventSpool(base, max_bytes=10_000_000)
    _spool_with(base / "p1", 2500).close()
    live = _spool_with(base / "p2", 10)
    _spool_with(base / "p3", 0).close()
    assert sibling_spools(base, own.directory) == [base / "p1", base / "p2", base / "p3"]
    idle_meta = (base / "p3" / "meta").stat().st_mtime_ns
    orphans = OrphanSpools(base, own, max_bytes=10_000_000)
    assert orphans.scan() == [base / "p1"]
    assert orphans.waiting == 2500
    assert (base / "p3" / "meta").stat().st_mtime_ns == idle_meta  # not even opened
    moved: list[tuple[int, bytes]] = []
    released: list[tuple[Path, int]] = []
    for _ in range(10):
        batch, done = orphans.step()
        moved += batch
        released += done
    assert [p for _, p in moved] == [f"p1-{i}".encode() for i in range(2500)]
    assert [seq for seq, _ in moved] == list(range(1, 2501))
    assert released == [(base / "p1", 2500)]
    assert orphans.held == [] and orphans.waiting == 0 and orphans.adopted_total == 2500
    again = EventSpool(base / "p1", max_bytes=10_000_000)  # released, and empty
    assert again.waiting == 0
    again.close()
    assert orphans.scan() == []  # p2 is still held by its live owner
    live.close()
    own.close()


def test_a_shutdown_mid_adoption_leaves_the_rest_in_the_orphan(tmp_path: Path) -> None:
    """What was not moved stays in the orphan (acknowledged only as far as
    moved) for the next process; nothing is moved twice."""
    base = tmp_path / "spool"
    own = EventSpool(base, max_bytes=10_000_000)
    _spool_with(base / "p1", 1500).close()
    orphans = OrphanSpools(base, own, max_bytes=10_000_000)
    orphans.scan()
    first, _ = orphans.step()
    orphans.release()
    rest = EventSpool(base / "p1", max_bytes=10_000_000)
    assert rest.waiting == 1500 - len(first)
    rest.close()
    own.close()
