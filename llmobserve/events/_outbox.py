"""The bounded in-memory window over the spool, shared by both deliveries.

The spool on disk is the truth; the outbox keeps the oldest unacknowledged
records in memory (up to C{max_bytes}) so the sender rarely touches the
disk. When the window is full, new records stay on disk only and are read
back (in a thread) once acknowledgements make room. A dead or black-holed
collector therefore costs at most C{max_bytes} of memory, however long it
stays away.

Everything here runs on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Outbox", "ReadAfter", "Record"]

#: (seq, packed event)
Record = tuple[int, bytes]
#: read(after_seq, max_records, max_bytes) -> Deferred((records, highest seq on disk))
ReadAfter = Callable[[int, int, int], "Deferred[tuple[list[Record], int]]"]

_READ_RECORDS: Final = 2000


def _nothing_on_disk(
    after: int, max_records: int, max_bytes: int
) -> Deferred[tuple[list[Record], int]]:
    return succeed(([], after))


class Outbox:
    """Records with seq above the ack point, oldest first, partly in memory.

    @ivar acked_seq: the delivery's cumulative acknowledgement.
    @ivar last_seq: the highest seq appended to the spool.
    """

    _log = Logger()

    def __init__(
        self,
        read_after: ReadAfter | None = None,
        *,
        acked_seq: int,
        last_seq: int,
        max_bytes: int = 8 * 1024 * 1024,
        on_ready: Callable[[], None] = lambda: None,
        on_acked: Callable[[int], None] = lambda seq: None,
    ) -> None:
        self.read_after: ReadAfter = read_after or _nothing_on_disk
        self.acked_seq = acked_seq
        self.last_seq = last_seq
        self.max_bytes = max_bytes
        self.on_ready = on_ready
        self.on_acked = on_acked
        self._mem: list[Record] = []
        self._head = 0  # index of the oldest unacked record in _mem
        self._send = 0  # index of the next record to send
        self._mem_bytes = 0
        self._mem_last = acked_seq  # highest seq in memory, or the ack point
        self._loading = False
        self._early: dict[int, bytes] = {}  # offered ahead of a missing seq

    @property
    def waiting(self) -> int:
        """Records appended but not acknowledged."""
        return self.last_seq - self.acked_seq

    @property
    def memory_bytes(self) -> int:
        """Payload bytes held in memory."""
        return self._mem_bytes

    @property
    def in_flight(self) -> int:
        """Records sent and not yet acknowledged."""
        return self._send - self._head

    @property
    def sent_seq(self) -> int:
        """The seq of the last record handed out by L{take}."""
        return self._mem[self._send - 1][0] if self._send > self._head else self.acked_seq

    def offer(self, seq: int, payload: bytes) -> None:
        """A record was just appended to the spool (reactor thread).

        The caller tells the delivery to send (C{pump}) once after a burst
        of offers, so that they travel in one batch.

        Parse threads append concurrently, so their results can arrive out
        of seq order: early ones wait (briefly, bounded by the parse pool's
        size) until the gap before them is filled.
        """
        if seq != self.last_seq + 1:
            if seq > self.last_seq:
                self._early[seq] = payload
            return
        self._accept(seq, payload)
        early = self._early
        while early:
            payload = early.pop(self.last_seq + 1, b"")
            if not payload:
                break
            self._accept(self.last_seq + 1, payload)

    def _accept(self, seq: int, payload: bytes) -> None:
        caught_up = self._mem_last == self.last_seq and not self._loading
        self.last_seq = seq
        if caught_up and self._mem_bytes + len(payload) <= self.max_bytes:
            self._mem.append((seq, payload))
            self._mem_bytes += len(payload)
            self._mem_last = seq

    def take(self, max_records: int, max_bytes: int) -> list[Record]:
        """The next records to send (at least one if any is ready).

        Returns an empty list when nothing is ready; if records wait on disk,
        a read starts and C{on_ready} is called when it lands.
        """
        end = len(self._mem)
        start = self._send
        if start >= end:
            self._maybe_load()
            return []
        stop, size = start, 0
        while stop < end and stop - start < max_records:
            size += len(self._mem[stop][1])
            stop += 1
            if size >= max_bytes:
                break
        self._send = stop
        return self._mem[start:stop]

    def ack(self, seq: int) -> None:
        """Cumulative acknowledgement up to C{seq} (clamped to what was sent)."""
        seq = min(seq, self.sent_seq)
        if seq <= self.acked_seq:
            return
        head = self._head
        while head < self._send and self._mem[head][0] <= seq:
            self._mem_bytes -= len(self._mem[head][1])
            head += 1
        self._head = head
        self.acked_seq = seq
        self.on_acked(seq)
        if head > 1024 and head * 2 > len(self._mem):
            del self._mem[:head]
            self._send -= head
            self._head = 0
        if self.has_unsent:
            self.on_ready()

    @property
    def has_unsent(self) -> bool:
        """Are there records not yet handed out, in memory or on disk?"""
        return self._send < len(self._mem) or self._mem_last < self.last_seq

    def rewind(self) -> None:
        """The link was lost: everything unacknowledged is to be sent again."""
        self._send = self._head

    def replay(self, after_seq: int) -> None:
        """Send everything after C{after_seq} again, even what was
        acknowledged (the store that had it lost it): the window is emptied
        and refilled from the spool."""
        if after_seq >= self.acked_seq:
            return
        self.acked_seq = after_seq
        self._mem = []
        self._head = self._send = 0
        self._mem_bytes = 0
        self._mem_last = after_seq

    def _maybe_load(self) -> None:
        if self._loading or self._mem_last >= self.last_seq:
            return
        room = self.max_bytes - self._mem_bytes
        if room < self.max_bytes // 4 and self._head < len(self._mem):
            return  # wait for acks to free a useful share of the window
        self._loading = True
        after = self._mem_last
        d = self.read_after(after, _READ_RECORDS, room)
        d.addCallbacks(self._loaded, self._load_failed, callbackArgs=(after,))

    def _loaded(self, result: tuple[list[Record], int], after: int) -> None:
        records, disk_last = result
        self._loading = False
        if after != self._mem_last:
            # a replay moved the window meanwhile: read again from there
            self.on_ready()
            return
        taken = 0
        for seq, payload in records:
            if seq <= self._mem_last:
                continue
            if self._mem_bytes + len(payload) > self.max_bytes and self._head < len(self._mem):
                break  # the rest stays on disk; an oversized record is taken alone
            self._mem.append((seq, payload))
            self._mem_bytes += len(payload)
            self._mem_last = seq
            taken += 1
        if records and not taken:
            return  # no room after all: the next ack calls on_ready again
        if not records and disk_last > self._mem_last:
            # the seqs up to disk_last are gone from disk (torn records): skip
            # them, and count them delivered if nothing older is outstanding
            self._mem_last = disk_last
            if self._head == len(self._mem):
                self.acked_seq = disk_last
                self.on_acked(disk_last)
        self.on_ready()

    def _load_failed(self, failure: Failure) -> None:
        self._loading = False
        self._log.failure("reading the spool back failed", failure)
