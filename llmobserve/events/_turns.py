"""Let the event threads run between the reactor's turns, not inside them.

The parse threads share a core, and the GIL, with the reactor. A thread that
gives the GIL up now and then (C{os.sched_yield}) takes it straight back at
the reactor's next system call: every C{send} and C{recv} lets it in again,
so a request that meets a parse batch waits for a slice of parsing at each
of its system calls. Traced at c=1 with events on: a request that met a
32-exchange batch took ~560 us, in three stretches of ~60 us between
~200 us parse slices.

L{ReactorTurns} counts the reactor's turns (it wraps the reactor's
C{doIteration}, the poll at the bottom of every loop). A thread that has
used its slice calls L{ReactorTurns.pause}: it sleeps, without the GIL,
until the reactor starts its next turn (or C{max_wait} passes), so the turn
under way runs to its end undisturbed and the thread gets the GIL back while
the reactor waits in its poll. A reactor without C{doIteration} (a test
double) leaves L{install} a no-op and L{pause} a plain C{sched_yield}, as
does a reactor that never calls it (asyncio's, which runs its own loop).

Pausing only pays while the reactor's turns are short. A saturated reactor
(c=64) works through long turns, a pause then waits milliseconds and each
one costs the paused thread its CPU caches: measured at c=64, pausing the
store thread every 8 rows cost ~18 us per request and the parse threads'
pauses ~5 us. So a pause that had to wait C{busy_wait} or more (c=1: 99% of
waits are under ~0.5 ms; c=64: half reach the 2 ms C{max_wait}) while the
reactor thread was on the CPU for at least a third of that time (a long wait
for an idle reactor, asleep in its poll, says nothing) means the reactor is
busy: for the next C{free_for} every L{pause} returns at once, the threads
run freely, and latency is the queue's anyway.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["ReactorTurns"]

_yield_cpu: Final[Callable[[], None]] = getattr(os, "sched_yield", lambda: time.sleep(0))


def _thread_cpu_clock() -> Callable[[], float] | None:
    """The CPU time of the calling thread (the reactor's), readable from any
    thread; None where the platform has no per-thread CPU clocks."""
    try:
        clock_id = time.pthread_getcpuclockid(threading.get_ident())
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):
        return None

    def reactor_cpu() -> float:
        try:
            return time.clock_gettime(clock_id)
        except OSError:  # the thread is gone (the process is exiting)
            return 0.0

    return reactor_cpu


class ReactorTurns:
    """The reactor's turn counter, and a place for threads to wait for the next turn.

    @ivar turn: how many turns the reactor has started since L{install}.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        max_wait: float = 0.002,
        busy_wait: float = 0.001,
        free_for: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reactor = reactor
        self.max_wait = max_wait
        self.busy_wait = busy_wait
        self.free_for = free_for
        self._clock = clock
        self._free_until = -1.0  # pauses return at once until then (reactor busy)
        self._reactor_cpu: Callable[[], float] | None = None
        self.turn = 0
        self._waiting = 0
        self._cond = threading.Condition(threading.Lock())
        self._shadowed: Any = None  # an instance attribute we replaced, if any
        self._wrapper: Any = None

    def install(self) -> bool:
        """Start counting turns; False if this reactor has no C{doIteration}
        to wrap. Call it in the reactor's thread (its CPU time is watched)."""
        original = getattr(self._reactor, "doIteration", None)
        if original is None or self._wrapper is not None:
            return False
        self._shadowed = vars(self._reactor).get("doIteration")
        self._reactor_cpu = _thread_cpu_clock()

        def doIteration(delay: float | None) -> None:
            self.turn += 1
            if self._waiting:
                with self._cond:
                    self._cond.notify_all()
            original(delay)

        self._reactor.doIteration = self._wrapper = doIteration
        return True

    def uninstall(self) -> None:
        """Stop counting (reactor thread) and release every waiting thread.

        Our wrapper is taken off only while it is the outermost one: under
        another's (a second pipeline on the same reactor, in tests), it stays
        and keeps calling through, so that one's own uninstall is not undone.
        """
        if self._wrapper is not None:
            if vars(self._reactor).get("doIteration") is self._wrapper:
                if self._shadowed is None:
                    del self._reactor.doIteration
                else:
                    self._reactor.doIteration = self._shadowed
            self._shadowed = self._wrapper = None
        with self._cond:
            self.turn += 1
            self._cond.notify_all()

    def pause(self) -> None:
        """Sleep, without the GIL, until the reactor's next turn starts or
        C{max_wait} has passed (any thread but the reactor's); return at once
        while the reactor is busy (see the module docstring)."""
        if self._wrapper is None or not self.turn:
            # no turn seen yet: a reactor whose loop does not go through
            # doIteration (asyncio's runs its own) would never end a pause
            _yield_cpu()
            return
        start = self._clock()
        if start < self._free_until:
            return
        cpu = self._reactor_cpu
        cpu_start = cpu() if cpu is not None else 0.0
        turn = self.turn
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self.turn != turn, self.max_wait)
            finally:
                self._waiting -= 1
        end = self._clock()
        waited = end - start
        if waited >= self.busy_wait and cpu is not None and cpu() - cpu_start >= waited / 3:
            self._free_until = end + self.free_for
