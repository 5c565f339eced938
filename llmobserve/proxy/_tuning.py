"""The process-wide tuning of C{twistd llmobserve}, behind one switch.

Four changes reach beyond the proxy's own objects, into the reactor, the C
allocator and the garbage collector of the whole process:

  - the reactor's own poll step (C{_poll.install_lean_poll});
  - glibc's malloc arenas capped at two (C{_malloc.limit_malloc_arenas});
  - C{gc.freeze()} once listening: the start-up heap leaves the cyclic
    collector's full passes;
  - C{malloc_trim} after that (C{_malloc.release_free_memory}).

Each paid for itself when measured (docs/ARCHITECTURE.md, "Hot-path
rules"). C{--no-tuning} turns all four off, for a process embedded next to
other code, a debugging session or a comparison.
"""

from __future__ import annotations

import gc
from typing import Any

import attrs
from twisted.logger import Logger

from llmobserve.proxy._malloc import limit_malloc_arenas, release_free_memory
from llmobserve.proxy._poll import install_lean_poll

__all__ = ["ProcessTuning"]

_log = Logger()


@attrs.define
class ProcessTuning:
    """Applies the process-wide tuning in two steps, or nothing when disabled.

    @ivar applied: what was applied, in order (C{poll}, C{malloc_arenas},
        C{gc_freeze}, C{malloc_trim}); a step the platform does not allow
        (no epoll, no glibc, C{MALLOC_ARENA_MAX} set) is left out.
    """

    enabled: bool
    applied: list[str] = attrs.field(factory=list)

    def before_services(self, reactor: Any) -> None:
        """Before any service starts: the event pipeline wraps the poll step
        and starts the threads whose malloc arenas this caps."""
        if not self.enabled:
            return
        if install_lean_poll(reactor):
            self.applied.append("poll")
        if limit_malloc_arenas():
            self.applied.append("malloc_arenas")

    def after_listening(self) -> None:
        """Once the port is bound: everything built at start-up lives as long
        as the process, so keep it out of the cyclic collector's full passes
        (tens of milliseconds each over this heap), then hand what start-up
        freed back to the kernel. Logs what was applied, once."""
        if not self.enabled:
            _log.info("process tuning: off (--no-tuning)")
            return
        gc.collect()
        gc.freeze()
        self.applied.append("gc_freeze")
        if release_free_memory():
            self.applied.append("malloc_trim")
        _log.info("process tuning: {steps}", steps=", ".join(self.applied))
