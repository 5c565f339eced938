"""The on-disk spool: append, replay, ack, delete, torn records, cap, lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.tmpfs import fill, small_tmpfs, unfill

from llmobserve.events._spool import SEGMENT_MAGIC, EventSpool, SpoolLocked
from llmobserve.events.pipeline import open_spool


def payload(i: int, size: int = 100) -> bytes:
    return f"event-{i:06d}-".encode().ljust(size, b".")


def segments(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith("seg-"))


def read_all(spool: EventSpool, after: int = 0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while True:
        got, _last = spool.read(after, 37, 10_000)
        if not got:
            return out
        out.extend(got)
        after = got[-1][0]


def test_append_replay_ack_delete(tmp_path: Path) -> None:
    """Records survive a restart in order; acked segments go; seqs never repeat."""
    spool = EventSpool(tmp_path, max_bytes=1_000_000, segment_bytes=4096)
    seqs = [spool.append(payload(i)) for i in range(200)]
    assert seqs == list(range(1, 201))
    proxy_id = spool.proxy_id
    assert len(segments(tmp_path)) > 3  # rotated at ~4 KiB
    spool.close()

    spool = EventSpool(tmp_path, max_bytes=1_000_000, segment_bytes=4096)
    assert spool.proxy_id == proxy_id
    assert spool.waiting == 200 and spool.stats.records == 200 and spool.stats.torn == 0
    assert read_all(spool) == [(i + 1, payload(i)) for i in range(200)]
    before = len(segments(tmp_path))
    spool.ack(120)
    spool.sync()
    after = segments(tmp_path)
    assert len(after) < before
    # every record above the ack point is still readable after the deletion
    assert [s for s, _ in read_all(spool, 120)] == list(range(121, 201))
    assert spool.append(payload(999)) == 201
    spool.close()

    spool = EventSpool(tmp_path, max_bytes=1_000_000, segment_bytes=4096)
    assert spool.acked_seq == 120 and spool.last_seq == 201
    assert [s for s, _ in read_all(spool, spool.acked_seq)] == list(range(121, 202))
    spool.ack(201)
    spool.sync()
    spool.close()
    spool = EventSpool(tmp_path, max_bytes=1_000_000, segment_bytes=4096)
    assert spool.waiting == 0 and read_all(spool) == []
    assert spool.append(payload(0)) == 202  # never reused, even with every segment gone
    spool.close()


def test_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    """A record cut off mid-write (SIGKILL, power loss) is skipped; the rest replays."""
    spool = EventSpool(tmp_path)
    for i in range(10):
        spool.append(payload(i))
    spool.close()
    seg = segments(tmp_path)[-1]
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 30)
    spool = EventSpool(tmp_path)
    assert spool.stats.torn == 1 and spool.torn_total == 1
    assert [s for s, _ in read_all(spool)] == list(range(1, 10))
    # a torn record never counted: its seq is given again, in a fresh segment
    assert spool.append(payload(10)) == 10
    assert len(segments(tmp_path)) == 2
    spool.close()


def test_an_empty_segment_left_by_a_crash_is_dropped(tmp_path: Path) -> None:
    """A crash right after a rotation leaves an empty segment; it never shadows new data."""
    spool = EventSpool(tmp_path, segment_bytes=4096)
    for i in range(10):
        spool.append(payload(i))
    spool.close()
    (tmp_path / "seg-00000000000000000011").write_bytes(SEGMENT_MAGIC)
    spool = EventSpool(tmp_path, segment_bytes=4096)
    assert spool.append(payload(10)) == 11
    spool.ack(10)  # deletes the delivered segments, never the active one
    spool.sync()
    spool.close()
    spool = EventSpool(tmp_path, segment_bytes=4096)
    assert spool.acked_seq == 10
    assert read_all(spool, 10) == [(11, payload(10))]
    spool.close()


def test_corrupt_record_ends_its_segment_only(tmp_path: Path) -> None:
    """A CRC mismatch stops reading that segment; later segments still replay."""
    spool = EventSpool(tmp_path, segment_bytes=4096)
    for i in range(100):
        spool.append(payload(i))
    spool.close()
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[len(SEGMENT_MAGIC) + 16 + 3] ^= 0xFF  # first record's payload
    first.write_bytes(bytes(data))
    spool = EventSpool(tmp_path, segment_bytes=4096)
    assert spool.stats.torn == 1
    got = [s for s, _ in read_all(spool)]
    assert got and got[0] > 1 and got[-1] == 100
    spool.close()


def test_cap_refuses_appends_until_acks_free_space(tmp_path: Path) -> None:
    """Over the cap an append returns None (the pipeline counts it); force writes anyway."""
    spool = EventSpool(tmp_path, max_bytes=20_000, segment_bytes=4096)
    results = [spool.append(payload(i, 500)) for i in range(60)]
    accepted = [r for r in results if r is not None]
    assert 20 < len(accepted) < 60 and results[-1] is None
    assert spool.total_bytes <= 20_000
    assert spool.append(b"gap", force=True) is not None
    spool.ack(accepted[-1])
    spool.sync()
    assert spool.total_bytes < 8000
    assert spool.append(payload(0, 500)) is not None
    spool.close()


def test_low_priority_records_are_refused_first(tmp_path: Path) -> None:
    """The last reserve_bytes under the cap take only important records (class 0)."""
    spool = EventSpool(tmp_path, max_bytes=20_000, segment_bytes=4096, reserve_bytes=5_000)
    low = [spool.append_many([payload(i, 500)], low=[True])[0] for i in range(40)]
    taken_low = [s for s in low if s is not None]
    assert low[-1] is None and spool.total_bytes <= 15_000
    assert spool.total_bytes > 15_000 - 600, "low records fill up to the reserve"
    mixed = spool.append_many([payload(50, 500), payload(51, 500)], low=[True, False])
    assert mixed[0] is None and mixed[1] is not None, "an important record still fits"
    important = [spool.append(payload(i, 500)) for i in range(60, 80)]
    assert important[0] is not None and important[-1] is None
    assert 15_000 < spool.total_bytes <= 20_000
    spool.ack(taken_low[-1])
    spool.sync()
    assert spool.append_many([payload(90, 500)], low=[True]) != [None], "room again after acks"
    spool.close()


def test_append_many_is_one_write_with_per_record_cap(tmp_path: Path) -> None:
    """A batch gets consecutive seqs; records over the cap get None, the rest are written."""
    spool = EventSpool(tmp_path, max_bytes=16_384, segment_bytes=4096)
    assert spool.append_many([payload(0), payload(1)]) == [1, 2]
    seqs = spool.append_many([payload(i, 3000) for i in range(8)])
    assert seqs == [3, 4, 5, 6, 7, None, None, None]  # ~3 KiB each under a 16 KiB cap
    assert spool.append_many([payload(9)]) == [8]
    spool.close()
    spool = EventSpool(tmp_path, max_bytes=1_000_000)
    assert [s for s, _ in read_all(spool)] == [1, 2, 3, 4, 5, 6, 7, 8]
    spool.close()


def test_spool_files_hold_only_what_was_appended(tmp_path: Path) -> None:
    """The spool adds framing only: no header or query ever reaches it but the payload."""
    spool = EventSpool(tmp_path)
    spool.append(b"only-this")
    spool.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"only-this" in blob and blob.count(b"only-this") == 1


def _crash(spool: EventSpool) -> None:
    """What SIGKILL leaves: every write made, no sync, no close, the lock gone."""
    for seg in spool._segments:
        if seg.fd is not None:
            os.close(seg.fd)
    for fd in spool._unsynced:
        os.close(fd)
    os.close(spool._lock_fd)


def test_the_ack_point_is_persisted_at_most_every_meta_interval(tmp_path: Path) -> None:
    """Persisting the ack point is the costly part of a sync, so it happens at
    most once per meta_interval (and always at close). A segment goes only
    once the persisted ack point covers it: a crash in between resends
    acknowledged records, and never loses one that was not."""
    now = [100.0]
    spool = EventSpool(tmp_path, segment_bytes=4096, meta_interval=1.0, clock=lambda: now[0])
    for i in range(200):
        spool.append(payload(i))
    spool.ack(50)
    spool.sync()  # the first change is persisted at once
    kept = segments(tmp_path)
    now[0] += 0.5
    spool.ack(150)
    spool.sync()  # within the interval: fsynced, ack point not persisted yet
    assert segments(tmp_path) == kept  # nothing deleted past the persisted point
    _crash(spool)

    spool = EventSpool(tmp_path, segment_bytes=4096, meta_interval=1.0, clock=lambda: now[0])
    assert spool.acked_seq == 50  # 51..150 are resent: the store deduplicates them
    assert [s for s, _ in read_all(spool, 50)] == list(range(51, 201))
    spool.ack(150)
    spool.sync()  # a new process persists its first change at once
    now[0] += 0.5
    spool.ack(200)
    spool.sync()
    spool.close()  # close always persists
    spool = EventSpool(tmp_path, segment_bytes=4096)
    assert spool.acked_seq == 200 and read_all(spool, 200) == []
    spool.close()


def test_one_process_per_directory(tmp_path: Path) -> None:
    """A second owner is refused; open_spool falls back to a sibling directory."""
    first = EventSpool(tmp_path)
    with pytest.raises(SpoolLocked):
        EventSpool(tmp_path)
    second = open_spool(tmp_path, max_bytes=1_000_000)
    assert second.directory == tmp_path / "p1"
    assert second.proxy_id != first.proxy_id
    second.close()
    first.close()
    again = EventSpool(tmp_path)
    assert again.proxy_id == first.proxy_id
    again.close()


def test_files_are_private(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    spool.append(b"x")
    spool.close()
    for p in tmp_path.iterdir():
        assert os.stat(p).st_mode & 0o077 == 0, p


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_full_disk_at_rotation_leaks_no_descriptor_and_heals(tmp_path: Path) -> None:
    """Issue 13 item 4, with a real ENOSPC (a tiny tmpfs): a segment that
    cannot be started is closed and removed, not leaked once per failed
    batch; the failure is reported (C{error}), appends are refused (the
    caller counts the drops), rotation is retried only after
    C{retry_interval}, and once there is room again appends succeed and
    every accepted record reads back."""
    with small_tmpfs(tmp_path / "disk", kib=64) as disk:
        now = [0.0]
        spool = EventSpool(
            disk / "spool", max_bytes=1_000_000, segment_bytes=4096, clock=lambda: now[0]
        )
        accepted: list[int] = []
        while not accepted or segments(disk / "spool")[-1].stat().st_size < 4096:
            seq = spool.append(payload(len(accepted)))
            assert seq is not None
            accepted.append(seq)
        # the active segment is full: the next append starts a new one
        fill(disk)
        fds = _open_fds()
        refused = 0
        for i in range(300):  # many failed batches, each past the segment size
            if spool.append_many([payload(1000 + i, 2000)] * 3)[0] is None:
                refused += 1
            now[0] += 0.01
        assert refused > 250
        assert _open_fds() <= fds, "a failed rotation left a descriptor open"
        assert spool.error is not None and "No space left" in spool.error
        # a tiny record still fits the old segment's last page; the segment
        # that cannot be started is still the spool's problem (CI saw /health
        # go back to ok with the disk still full, once a gap record fitted)
        fitted = 0
        while spool.append(b"tiny") is not None:
            fitted += 1
            assert spool.error is not None and "cannot start a segment" in spool.error
        assert fitted > 0, "no room left in the last page: the check above never ran"
        files = segments(disk / "spool")
        assert all(p.stat().st_size > len(SEGMENT_MAGIC) for p in files), "empty segment left"
        unfill(disk)
        now[0] += spool.retry_interval
        later = [spool.append(payload(2000 + i)) for i in range(60)]
        assert None not in later
        assert spool.error is None
        spool.sync()  # closes the segment rotated away from
        assert _open_fds() <= fds + 1  # at most the new active segment
        accepted += [s for s in later if s is not None]
        got = [seq for seq, _ in read_all(spool)]
        assert set(accepted) <= set(got)
        spool.close()


def test_a_removed_directory_is_recreated_and_its_lost_records_counted(tmp_path: Path) -> None:
    """Issue 13 item 3: the spool directory removed under a live spool. A
    read counts the records of the removed segments as lost (once, for a
    gap record) instead of skipping them as if delivered, still reads the
    active segment through its open descriptor, and the next sync recreates
    the directory (lock, meta) with appends going to a new segment in it."""
    import shutil

    d = tmp_path / "spool"
    spool = EventSpool(d, max_bytes=1_000_000, segment_bytes=4096)
    for i in range(100):
        spool.append(payload(i))
    active_first = int(segments(d)[-1].name[4:])
    shutil.rmtree(d)
    got = [seq for seq, _ in read_all(spool)]
    assert got == list(range(active_first, 101)), "the active segment is read through its fd"
    assert spool.take_lost() == active_first - 1
    assert spool.take_lost() == 0 and spool.lost_total == active_first - 1
    spool.sync()
    assert d.is_dir() and (d / "LOCK").exists() and (d / "meta").exists()
    assert spool.recreated_total == 1
    # the active segment was copied into the new directory: appends go on there
    assert [p.name for p in segments(d)] == [f"seg-{active_first:020d}"]
    assert spool.append(payload(500)) == 101
    assert [seq for seq, _ in read_all(spool, active_first - 1)] == list(range(active_first, 102))
    spool.ack(active_first - 1)
    spool.close()
    again = EventSpool(d, max_bytes=1_000_000, segment_bytes=4096)
    assert [seq for seq, _ in read_all(again, again.acked_seq)] == list(range(active_first, 102))
    assert again.take_lost() == 0
    again.close()
