"""C{--retain 90d}: events older than the span are deleted, on both back ends.

L{Retention} runs in the collector: at start-up and then every C{interval}
seconds it asks the writer thread to delete events whose C{ts} is older
than C{now - span}, in chunks of C{chunk} rows (L{Store.drop_before}: one
short transaction each over the C{ts} index), each chunk a job of its own
so that inserts go in between. The count of stored events (C{/health})
goes down by what was deleted.
"""

from __future__ import annotations

import re
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ._store import Store
from ._writer import BatchWriter, JobRunner

__all__ = ["Retention", "format_span", "parse_span"]

_SPAN: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_span(text: str) -> float:
    """Seconds in C{90d}, C{12h}, C{2w}, C{30m}, C{90s}.

    @raise ValueError: any other form, or a span of zero.
    """
    m = _SPAN.match(text)
    if m is None:
        raise ValueError(f"cannot read span {text!r}: use a number and s, m, h, d or w (90d)")
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"span {text!r} must be more than zero")
    return seconds


def format_span(seconds: float) -> str:
    """A span as C{--retain} takes it, in its largest whole unit (C{172800}
    is C{2d}, C{5400} is C{90m}); seconds, as a number, otherwise."""
    for unit in "wdhm":
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class Retention(Service):
    """Deletes events older than C{span} seconds, now and every C{interval}.

    @ivar dropped: events deleted since start-up.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        runner: JobRunner,
        writer: BatchWriter,
        span: float,
        *,
        interval: float = 3600.0,
        chunk: int = 10_000,
    ) -> None:
        self._clock = clock
        self._runner = runner
        self._writer = writer
        self.span = span
        self.chunk = chunk
        self.dropped = 0
        self._running: Deferred[None] | None = None
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        if self._loop.running:
            self._loop.stop()

    def sweep(self) -> Deferred[None]:
        """Delete what is older than the span, chunk by chunk; fires when done."""
        if self._running is not None:
            return self._running
        cutoff = self._clock.seconds() - self.span
        done: Deferred[None] = Deferred()
        self._running = done
        total = [0]

        def job(store: Store) -> int:
            return store.drop_before(cutoff, self.chunk)

        def step(n: int) -> None:
            total[0] += n
            self.dropped += n
            self._writer.stored = max(0, self._writer.stored - n)
            if n >= self.chunk and self.running:
                self._runner.submit(job).addCallbacks(step, failed)
            else:
                finish()

        def failed(failure: Any) -> None:
            self.log.failure("retention: deleting old events failed", failure)
            finish()

        def finish() -> None:
            if total[0]:
                self.log.info(
                    "retention: deleted {n} events older than {span}",
                    n=total[0],
                    span=format_span(self.span),
                )
            self._running = None
            done.callback(None)

        self._runner.submit(job).addCallbacks(step, failed)
        return done
