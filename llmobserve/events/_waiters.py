"""Deferreds that wait for a condition, each bounded by its own deadline."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Waiters", "after"]


class Waiters:
    """Callers wait for "done" (True) or their deadline (False), never longer."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: dict[Deferred[bool], IDelayedCall] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def wait(self, timeout: float) -> Deferred[bool]:
        """A Deferred that fires True on L{fire}, or False after C{timeout}."""
        d: Deferred[bool] = Deferred()
        self._waiting[d] = self._clock.callLater(timeout, self._expire, d)
        return d

    def _expire(self, d: Deferred[bool]) -> None:
        if self._waiting.pop(d, None) is not None:
            d.callback(False)

    def fire(self) -> None:
        """The condition holds: release every waiter."""
        waiting, self._waiting = self._waiting, {}
        for d, call in waiting.items():
            if call.active():
                call.cancel()
            d.callback(True)


def after(d: Deferred[Any]) -> Deferred[None]:
    """Fires (with None) once C{d} has run its current callbacks; C{d}'s own
    result, success or failure, stays with C{d}."""
    out: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(relay)
    return out
