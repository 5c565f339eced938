"""The on-disk spool: every event is appended here before it is sent.

Layout of a spool directory::

    LOCK                       flock()ed by the owning process
    meta                       msgpack map: proxy_id, acked_seq (atomic rename)
    seg-00000000000000000001   segment files, named by their first seq

A segment starts with the 8-byte magic C{LLMOSPL1}, then records::

    >I  payload length
    >I  CRC-32 of (seq bytes + payload)
    >Q  seq (per spool, strictly increasing; never reused, except the seq
        of a torn record that was never readable)
        payload: one packed event map

Appends are one C{os.write} each (so a record whose append returned
survives a SIGKILL); C{fsync} runs in batches from L{EventSpool.sync}, which
the pipeline calls in a thread on a timer. A torn or corrupt record ends the
readable part of its segment: it is skipped and counted, and replay goes on
with the next segment. Segments wholly at or below the acknowledged seq are
deleted. When the spool holds C{max_bytes}, appends are refused (the caller
counts the drop and writes a gap record later). The last C{reserve_bytes}
below the cap (a tenth by default) are kept for important records: an
append marked as low priority (class 1, see C{docs/EVENTS.md}) is refused
once the spool is that close to full, so those are dropped first.

Thread safety: every public method takes the spool's lock, so the reactor
may append and ack while a worker thread syncs or reads. Nothing here
blocks on the network; C{fsync} runs without the lock held.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import attrs
import msgpack

__all__ = ["EventSpool", "SpoolLocked"]

SEGMENT_MAGIC: Final = b"LLMOSPL1"
_HEADER: Final = struct.Struct(">IIQ")
_SEQ: Final = struct.Struct(">Q")
_MAX_RECORD: Final = 16 * 1024 * 1024
_SEG_PREFIX: Final = "seg-"


class SpoolLocked(Exception):
    """Another live process owns this spool directory."""


@attrs.define
class _Segment:
    path: Path
    first_seq: int  # from the name: the seq of its first record (if any)
    last_seq: int  # highest readable seq, first_seq - 1 when empty
    size: int  # bytes of the readable part (magic + whole records)
    fd: int | None = None  # open for appending (the active segment, or not yet synced)


@attrs.frozen
class SpoolStats:
    """What a startup scan found."""

    segments: int
    records: int
    torn: int


def _segment_name(first_seq: int) -> str:
    return f"{_SEG_PREFIX}{first_seq:020d}"


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of C{path}; None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _read_open_file(fd: int, start: int, size: int) -> bytes:
    """Bytes C{start:size} of the file open (write-only) as C{fd}, even when
    unlinked (Linux: through C{/proc/self/fd}); empty if it cannot be read."""
    try:
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            f.seek(start)
            return f.read(size - start)
    except OSError:
        return b""


def _scan(data: bytes, after_seq: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """Yield (end offset, seq, payload) for each whole, valid record.

    Stops at the first torn or corrupt record.
    """
    off = len(SEGMENT_MAGIC)
    n = len(data)
    hsize = _HEADER.size
    while off + hsize <= n:
        length, crc, seq = _HEADER.unpack_from(data, off)
        end = off + hsize + length
        if length > _MAX_RECORD or end > n:
            return
        payload = data[off + hsize : end]
        if zlib.crc32(payload, zlib.crc32(data[off + 8 : off + 16])) != crc:
            return
        off = end
        if seq > after_seq:
            yield off, seq, payload


class EventSpool:
    """Segmented, length-prefixed, CRC-checked append log of packed events.

    @ivar proxy_id: stable across restarts of this spool directory.
    @ivar acked_seq: every record up to it is delivered.
    @ivar last_seq: the highest seq appended (or found at start).
    @ivar torn_total: torn or corrupt records skipped since start.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 4 * 1024 * 1024,
        reserve_bytes: int | None = None,
        meta_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.meta_interval = meta_interval
        self._clock = clock
        self.max_bytes = max_bytes
        self.reserve_bytes = max_bytes // 10 if reserve_bytes is None else reserve_bytes
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 4))
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._total = 0
        self._unsynced: list[int] = []  # fds of rotated segments awaiting fsync+close
        self._dirty = False
        self._dir_dirty = False
        self._meta_written = -1
        self._meta_at = -math.inf  # when the ack point was last persisted
        self._read_hint: tuple[Path, int, int] | None = None  # (path, offset, last seq read)
        self.torn_total = 0
        self.closed = False
        #: why the last append or rotation failed (None once one succeeds;
        #: a failed rotation stays the error until a rotation succeeds, even
        #: while small appends still fit the old segment's last page)
        self.error: str | None = None
        self._rotate_error: str | None = None
        self.retry_interval = 1.0
        self._rotate_retry_at = -math.inf
        self._force_rotate = False
        #: records lost with segment files removed under the spool, counted
        #: by L{read} (L{take_lost} hands them over once) and in total
        self.lost_total = 0
        self._lost_pending = 0
        #: times the directory was found removed and was recreated
        self.recreated_total = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_id = _identity(self.directory)
        self._lock_fd = self._take_lock()
        try:
            self.proxy_id, self.acked_seq = self._read_meta()
            self.stats = self._load_segments()
            self.last_seq = max([self.acked_seq] + [s.last_seq for s in self._segments])
            self._open_segment(self.last_seq + 1)
            self._write_meta()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- start-up ---------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SpoolLocked(str(self.directory)) from None
            raise
        return fd

    def _read_meta(self) -> tuple[str, int]:
        try:
            meta = msgpack.unpackb((self.directory / "meta").read_bytes(), raw=False)
            proxy_id, acked = meta["proxy_id"], meta["acked_seq"]
            if isinstance(proxy_id, str) and isinstance(acked, int) and acked >= 0:
                return proxy_id, acked
        except FileNotFoundError:
            pass
        except Exception:
            pass  # unreadable meta: a new identity; the collector deduplicates on ids
        return uuid.uuid4().hex, 0

    def _load_segments(self) -> SpoolStats:
        records = torn = 0
        names = sorted(p for p in self.directory.iterdir() if p.name.startswith(_SEG_PREFIX))
        for path in names:
            try:
                first = int(path.name[len(_SEG_PREFIX) :])
            except ValueError:
                continue
            data = path.read_bytes()
            if not data.startswith(SEGMENT_MAGIC):
                if data:
                    torn += 1
                path.unlink()
                continue
            end, last, count = len(SEGMENT_MAGIC), first - 1, 0
            for end, last, _payload in _scan(data):  # noqa: B007 (last values wanted)
                count += 1
            if end < len(data):
                torn += 1
            records += count
            if last <= self.acked_seq or count == 0:
                # delivered, or empty (a crash right after a rotation): the
                # active segment about to be opened may even have its name
                path.unlink()
                continue
            self._segments.append(_Segment(path, first, last, end))
            self._total += end
        self.torn_total += torn
        return SpoolStats(len(self._segments), records, torn)

    def _open_segment(self, first_seq: int) -> None:
        """Create the segment for C{first_seq} and make it the active one.

        @raise OSError: it could not be created or its magic written (a full
            disk): nothing is left open, and no empty file behind.
        """
        path = self.directory / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            if os.write(fd, SEGMENT_MAGIC) != len(SEGMENT_MAGIC):
                raise OSError(errno.ENOSPC, "short write of a segment header")
        except BaseException:
            os.close(fd)
            try:
                path.unlink()
            except OSError:
                pass
            raise
        self._segments.append(_Segment(path, first_seq, first_seq - 1, len(SEGMENT_MAGIC), fd))
        self._total += len(SEGMENT_MAGIC)
        self._dir_dirty = True
        self._dirty = True

    # -- the reactor side -------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes on disk in live segments."""
        return self._total

    @property
    def waiting(self) -> int:
        """Records appended but not acknowledged (seq arithmetic; an upper bound)."""
        return self.last_seq - self.acked_seq

    def has_room(self, nbytes: int) -> bool:
        """Would a record of C{nbytes} payload fit under the cap?"""
        return self._total + _HEADER.size + nbytes <= self.max_bytes

    def append(self, payload: bytes, *, force: bool = False) -> int | None:
        """Append one record; return its seq, or None when the spool is full.

        @param force: write even over the cap (gap records, which are tiny).
        """
        return self.append_many([payload], force=force)[0]

    def append_many(
        self,
        payloads: list[bytes],
        *,
        force: bool = False,
        low: Sequence[bool] | None = None,
    ) -> list[int | None]:
        """Append records with one C{write(2)}; each gets its seq, or None
        when it did not fit under the cap (or the write failed).

        @param low: per payload, True for a low-priority record, which must
            also leave C{reserve_bytes} free under the cap.
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("spool is closed")
            active = self._segments[-1]
            if self._force_rotate or (
                active.size >= self.segment_bytes and active.last_seq >= active.first_seq
            ):
                self._rotate()
                active = self._segments[-1]
            seqs: list[int | None] = []
            parts: list[bytes] = []
            seq, total = self.last_seq, self._total
            low_cap = self.max_bytes - self.reserve_bytes
            for i, payload in enumerate(payloads):
                size = _HEADER.size + len(payload)
                if not force and (
                    total + size > self.max_bytes
                    or (low is not None and low[i] and total + size > low_cap)
                ):
                    seqs.append(None)
                    continue
                seq += 1
                crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
                parts.append(_HEADER.pack(len(payload), crc, seq))
                parts.append(payload)
                seqs.append(seq)
                total += size
            if not parts:
                return seqs
            data = b"".join(parts)
            assert active.fd is not None
            try:
                written = os.write(active.fd, data)
            except OSError as e:
                written = -1
                self._note_error("cannot append", e)
            if written != len(data):
                # disk full or a short write: cut the partial records off so the
                # segment stays readable past them, and report drops
                if written >= 0:
                    self._note_error(
                        "cannot append", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    )
                try:
                    os.ftruncate(active.fd, active.size)
                except OSError:
                    pass
                return [None] * len(payloads)
            self.error = self._rotate_error
            active.size += len(data)
            active.last_seq = seq
            self.last_seq = seq
            self._total = total
            self._dirty = True
            return seqs

    def _rotate(self) -> None:
        """Start a new segment. Should that fail (a full disk), the active
        one stays active (appends to it fail the same way, and are counted
        as drops) and the next try waits C{retry_interval}: a failed batch
        never leaves a descriptor open (issue 13 item 4)."""
        now = self._clock()
        if now < self._rotate_retry_at:
            return
        old = self._segments[-1]
        try:
            self._open_segment(self.last_seq + 1)
        except OSError as e:
            self._rotate_retry_at = now + self.retry_interval
            self._note_error("cannot start a segment", e)
            self._rotate_error = self.error
            return
        self._rotate_error = None
        self._force_rotate = False
        if old.fd is not None:
            self._unsynced.append(old.fd)
            old.fd = None

    def _note_error(self, doing: str, error: OSError) -> None:
        self.error = f"spool {doing}: {error.strerror or error}"

    def rewind_ack(self) -> int:
        """Move the ack point back to just before the oldest record still on
        disk (the store that had those lost them); return it. The new point
        is persisted at the next L{sync}, before any deletion by it."""
        with self._lock:
            oldest = self._segments[0].first_seq - 1
            if oldest < self.acked_seq:
                self.acked_seq = oldest
                self._meta_at = -math.inf
            return self.acked_seq

    def ack(self, seq: int) -> None:
        """Everything up to C{seq} is delivered (deletion happens in L{sync})."""
        with self._lock:
            if seq > self.acked_seq:
                self.acked_seq = min(seq, self.last_seq)

    @property
    def needs_sync(self) -> bool:
        """Is there anything for L{sync} to do?"""
        return (
            self._dirty
            or self._meta_written != self.acked_seq
            or (len(self._segments) > 1 and self._segments[0].last_seq <= self.acked_seq)
        )

    # -- the worker-thread side -------------------------------------------

    def sync(self, *, force: bool = False) -> None:
        """fsync appended data, persist the ack point, delete acked segments.

        Runs in a worker thread; appends may continue meanwhile. The ack
        point is persisted (a file written, fsynced and renamed: the costly
        part of a sync) at most every C{meta_interval} seconds unless
        C{force}; a segment is deleted only once the persisted ack point
        covers it, so a crash in between resends acknowledged events (which
        the store deduplicates) and never skips an unacknowledged one.
        """
        self._check_directory()
        with self._lock:
            if self.closed:
                return
            fds, self._unsynced = self._unsynced, []
            # nothing appended since the last sync: nothing to fsync
            active_fd = self._segments[-1].fd if self._dirty else None
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            self._dirty = False
            acked = self.acked_seq
            now = self._clock()
            if acked != self._meta_written and (force or now - self._meta_at >= self.meta_interval):
                self._meta_at = now
            else:
                acked = self._meta_written  # persisted: what deletion may go up to
            doomed = [s for s in self._segments[:-1] if s.last_seq <= acked]
            for seg in doomed:
                self._segments.remove(seg)
                self._total -= seg.size
            if self._read_hint is not None and any(s.path == self._read_hint[0] for s in doomed):
                self._read_hint = None
        for fd in fds:
            os.fsync(fd)
            os.close(fd)
        if active_fd is not None:
            try:
                os.fsync(active_fd)
            except OSError as e:  # closed by a concurrent close(): nothing left to do
                if e.errno != errno.EBADF:
                    raise
        if dir_dirty:
            self._fsync_dir()
        if acked != self._meta_written:
            self._write_meta(acked)
        for seg in doomed:
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass

    def _check_directory(self) -> None:
        """Recreate the directory if it was removed (or replaced) under the
        spool (issue 13 item 3): a new lock, the ack point written again, and
        appends move to a new segment in it at once. The records of the
        segments removed with it are counted as lost when L{read} misses
        them (those the outbox still holds in memory are delivered)."""
        if _identity(self.directory) == self._dir_id:
            return
        with self._lock:
            if self.closed:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            self._dir_id = _identity(self.directory)
            try:
                fd = self._take_lock()
            except (SpoolLocked, OSError):
                pass  # keep the old lock: this process still owns the spool
            else:
                os.close(self._lock_fd)
                self._lock_fd = fd
            self._meta_written = -1  # written again at this sync
            self._meta_at = -math.inf
            self._dir_dirty = True
            if not self._rehome(self._segments[-1]):
                self._force_rotate = True
                self._rotate_retry_at = -math.inf
            self.recreated_total += 1

    def _rehome(self, seg: _Segment) -> bool:
        """Copy the open (unlinked) segment C{seg} into the recreated
        directory and go on appending there; False if that failed (its
        records then stay readable only through the old descriptor until
        the next rotation)."""
        if seg.fd is None:
            return False
        data = _read_open_file(seg.fd, 0, seg.size)
        if len(data) != seg.size:
            return False
        try:
            fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError:
            return False
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.close(fd)
            try:
                seg.path.unlink()
            except OSError:
                pass
            return False
        self._unsynced.append(seg.fd)
        seg.fd = fd
        return True

    def take_lost(self) -> int:
        """Records found lost (their segment file gone) since the last call."""
        with self._lock:
            lost, self._lost_pending = self._lost_pending, 0
            return lost

    def _segment_gone(self, path: Path, after_seq: int) -> None:
        """L{read} found C{path} missing: count its records above
        C{after_seq} as lost, once, and forget the segment."""
        with self._lock:
            for seg in self._segments[:-1]:
                if seg.path == path:
                    lost = max(0, seg.last_seq - max(after_seq, seg.first_seq - 1))
                    self._lost_pending += lost
                    self.lost_total += lost
                    self._segments.remove(seg)
                    self._total -= seg.size
                    return

    def _fsync_dir(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _write_meta(self, acked: int | None = None) -> None:
        acked = self.acked_seq if acked is None else acked
        tmp = self.directory / "meta.tmp"
        data = msgpack.packb({"proxy_id": self.proxy_id, "acked_seq": acked}, use_bin_type=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "meta")
        self._meta_written = acked

    def read(
        self, after_seq: int, max_records: int, max_bytes: int
    ) -> tuple[list[tuple[int, bytes]], int]:
        """Records with seq > C{after_seq}, oldest first, for the sender.

        Returns at least one record if any exists (even one over C{max_bytes}),
        and the highest seq the spool held when the read began: a caller
        that gets nothing below it knows those seqs are lost (torn).
        """
        with self._lock:
            last = self.last_seq
            segs = [
                (s.path, s.first_seq, s.last_seq, s.size)
                for s in self._segments
                if s.last_seq > after_seq
            ]
            active = self._segments[-1]
            active_fd = active.fd
            hint = self._read_hint
        out: list[tuple[int, bytes]] = []
        total = 0
        for path, _first, _last, size in segs:
            start = 0
            if hint is not None and hint[0] == path and hint[2] <= after_seq:
                start = hint[1]
            try:
                with open(path, "rb") as f:
                    if start:
                        f.seek(start)
                    chunk = f.read(size - start)
            except FileNotFoundError:
                # removed with its directory: the active segment is still
                # open (read through the descriptor); any other is lost
                chunk = b""
                if path == active.path and active_fd is not None:
                    chunk = _read_open_file(active_fd, start, size)
                if not chunk:
                    self._segment_gone(path, after_seq)
                    continue
            data = SEGMENT_MAGIC + chunk if start else chunk
            base = start - len(SEGMENT_MAGIC) if start else 0
            here = (start or len(SEGMENT_MAGIC), after_seq)  # end offset, seq of the last taken
            for end, seq, payload in _scan(data, after_seq):
                if out and (len(out) >= max_records or total + len(payload) > max_bytes):
                    with self._lock:
                        self._read_hint = (path, *here)
                    return out, last
                out.append((seq, payload))
                total += len(payload)
                here = (base + end, seq)
        return out, last

    def close(self) -> None:
        """Final fsync, persist the ack point, release the directory."""
        if self.closed:
            return
        self.sync(force=True)
        with self._lock:
            self.closed = True
            for seg in self._segments:
                if seg.fd is not None:
                    os.fsync(seg.fd)
                    os.close(seg.fd)
                    seg.fd = None
        os.close(self._lock_fd)
