"""Adopting orphaned sub-spools: backlogs no live process will deliver.

Processes sharing one C{--spool-dir} each hold their own directory: the
first the directory itself, the others C{DIR/p1}, C{DIR/p2}, ... (see
C{pipeline.open_spool}). When one of them stops for good while its spool
still holds events (the collector was away, the store unusable), nobody
would send those: restarting another process does not, as it takes its own
directory again (issue 13 item 9).

So every process looks, at start and then every C{interval} seconds, for
those sibling directories whose C{LOCK} no live process holds, takes the
lock itself, and moves their backlog into its own spool, a batch at a time
(in the spool thread): records appended here and fsynced first, then
acknowledged there, so a crash in between sends some twice (the store
deduplicates on C{id}) and never loses one. Once empty, the orphan is
released (its lock dropped); the directory stays for whoever starts next.
Events keep their C{id} and C{proxy_id}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from llmobserve.events._spool import SEGMENT_MAGIC, EventSpool, SpoolLocked

__all__ = ["OrphanSpools", "sibling_spools"]

_BATCH_RECORDS: Final = 1000
_BATCH_BYTES: Final = 4 * 1024 * 1024


def sibling_spools(base: Path, own: Path, tries: int = 64) -> list[Path]:
    """The directories other processes sharing C{base} would spool in
    (C{base} itself and C{base/p1}... that exist), without C{own}."""
    found = [base] + [base / f"p{i}" for i in range(1, tries)]
    own = own.resolve()
    return [d for d in found if (d / "LOCK").exists() and d.resolve() != own]


class OrphanSpools:
    """The orphaned sub-spools this process holds, and moving them into its
    own spool. Every method but L{waiting} runs in the spool thread.

    @ivar adopted_total: records moved into this process's spool so far.
    """

    def __init__(self, base: Path, own: EventSpool, *, max_bytes: int) -> None:
        self.base = base
        self.own = own
        self.max_bytes = max_bytes
        self.held: list[EventSpool] = []
        self.adopted_total = 0
        self._waiting = 0
        self._moved: dict[Path, int] = {}

    @property
    def waiting(self) -> int:
        """Events in held orphans not moved yet (as of the last step)."""
        return self._waiting

    def scan(self) -> list[Path]:
        """Take every sibling directory no live process holds and that has a
        backlog; return the ones newly taken."""
        taken: list[Path] = []
        held = {spool.directory.resolve() for spool in self.held}
        for directory in sibling_spools(self.base, self.own.directory):
            if directory.resolve() in held or not _has_records(directory):
                continue
            try:
                orphan = EventSpool(directory, max_bytes=self.max_bytes)
            except (SpoolLocked, OSError):
                continue  # a live process holds it (or it cannot be read)
            if orphan.waiting:
                self.held.append(orphan)
                taken.append(directory)
            else:
                orphan.close()
        self._count()
        return taken

    def step(self) -> tuple[list[tuple[int, bytes]], list[tuple[Path, int]]]:
        """Move one batch from the first held orphan into the own spool.

        Returns the records appended to the own spool (seq there, payload),
        every one of which the caller must offer to the outbox, and the
        orphans emptied and released by this step (directory, records
        moved from it in all).
        """
        released: list[tuple[Path, int]] = []
        while self.held:
            orphan = self.held[0]
            records, _last = orphan.read(orphan.acked_seq, _BATCH_RECORDS, _BATCH_BYTES)
            if not records:
                self.held.pop(0)
                released.append((orphan.directory, self._moved.pop(orphan.directory, 0)))
                orphan.ack(orphan.last_seq)  # torn remains: nothing left to read
                orphan.close()
                continue
            seqs = self.own.append_many([payload for _, payload in records])
            appended = [
                (seq, payload)
                for seq, (_, payload) in zip(seqs, records, strict=True)
                if seq is not None
            ]
            # acknowledged there: the records up to the first refused one (the
            # own spool full); any appended past it is sent twice at worst
            done = next((i for i, seq in enumerate(seqs) if seq is None), len(seqs))
            if done:
                self.own.sync()  # on disk here before it is acknowledged there
                orphan.ack(records[done - 1][0])
                orphan.sync(force=True)
                self.adopted_total += done
                self._moved[orphan.directory] = self._moved.get(orphan.directory, 0) + done
            self._count()
            return appended, released
        self._count()
        return [], released

    def release(self) -> None:
        """Let go of every held orphan (shutdown): what was not moved waits
        there for the next process."""
        held, self.held = self.held, []
        for orphan in held:
            orphan.close()
        self._count()

    def _count(self) -> None:
        self._waiting = sum(orphan.waiting for orphan in self.held)


def _has_records(directory: Path) -> bool:
    """Does C{directory} hold a segment with a record in it? (Looked at
    before taking its lock: opening a spool writes its meta, which a scan
    every few seconds of idle siblings should not.)"""
    try:
        return any(
            p.name.startswith("seg-") and p.stat().st_size > len(SEGMENT_MAGIC)
            for p in directory.iterdir()
        )
    except OSError:
        return False
