"""Repeated log lines collapsed: a few of each kind per window, then a count.

A hostile or broken peer can make the same thing go wrong thousands of times
a second (a link reconnecting with garbage, a batch failing again and again);
one log line each filled 85 MB of log in ten seconds. L{LogLimiter} lets the
first C{burst} lines of each kind through in a window, counts the rest, and
when the window ends logs one line saying how many more there were.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["LogLimiter"]


class _Window:
    __slots__ = ("logged", "start", "suppressed", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.timer: IDelayedCall | None = None


class LogLimiter:
    """Decides, per kind of line, whether to log it now.

    Use: C{if limiter.allow("link protocol errors"): log.warn(...)}. The kind
    is a fixed description (never a peer or an id: the table of kinds stays
    small). At the end of a window in which lines were held back, one line
    "{kind}: ... and {n} more like this in the last {window} s" is logged.

    @param clock: for the windows.
    @param burst: lines of one kind logged per window.
    @param window: seconds.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, burst: int = 5, window: float = 60.0) -> None:
        self._clock = clock
        self._burst = burst
        self._window = window
        self._kinds: dict[str, _Window] = {}
        #: lines held back since start-up, all kinds together
        self.suppressed = 0

    def allow(self, kind: str) -> bool:
        """Whether a line of this kind may be logged now (counted if not)."""
        now = self._clock.seconds()
        w = self._kinds.get(kind)
        if w is None or now - w.start >= self._window:
            if w is not None:
                self._summarize(kind, w)
            w = self._kinds[kind] = _Window(now)
        if w.logged < self._burst:
            w.logged += 1
            return True
        w.suppressed += 1
        self.suppressed += 1
        if w.timer is None:
            w.timer = self._clock.callLater(w.start + self._window - now, self._expire, kind, w)
        return False

    def stop(self) -> None:
        """Log what is still held back and cancel the window timers."""
        for kind, w in list(self._kinds.items()):
            self._summarize(kind, w)
        self._kinds.clear()

    def _expire(self, kind: str, w: _Window) -> None:
        w.timer = None
        self._summarize(kind, w)
        if self._kinds.get(kind) is w:
            del self._kinds[kind]

    def _summarize(self, kind: str, w: _Window) -> None:
        if w.timer is not None and w.timer.active():
            w.timer.cancel()
        w.timer = None
        if w.suppressed:
            self.log.warn(
                "{kind}: ... and {n} more like this in the last {window:.0f} s",
                kind=kind,
                n=w.suppressed,
                window=self._window,
            )
            w.suppressed = 0
