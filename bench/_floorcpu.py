"""The floor's CPU per request, for benchmarks that measure in process.

C{bench.overhead} states the proxy's figures as ratios to stock
C{twisted.protocols.portforward} (C{bench._floor}) measured in the same
run: machines of this kind differ by 2.5x in CPython speed, and one
machine drifts between states tens of percent apart within minutes. A
benchmark of an in-memory rig (C{bench.budget_check}) keeps the floor
running beside it (its own process, pinned to the core the rig runs on;
the load generator on the others, 64 connections), measures it between
its rounds, and states its figure as a share of the floor's and as what
that share was on the anchors' machine, whose floor took
L{ANCHOR_FLOOR_CPU_US} per request (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.overhead import _build_requests, _floor, _loadgen, _pin, _upstream, _wrk_throughput

__all__ = ["ANCHOR_FLOOR_CPU_US", "running_floor"]

#: the floor's CPU per request on the anchors' machine (docs/PERFORMANCE.md)
ANCHOR_FLOOR_CPU_US = 38.0


@contextmanager
def running_floor(concurrency: int = 64) -> Iterator[Callable[[float], float]]:
    """Start the floor; yield a function that loads it for a duration (s)
    and gives its CPU per request (us). Meanwhile this process runs on
    the floor's core (the last one), the load generator on the others."""
    cores = sorted(os.sched_getaffinity(0))
    mine = set(cores)
    floor_cpus, others = ({cores[-1]}, set(cores[:-1])) if len(cores) >= 2 else (None, None)
    with (
        _upstream(0.0, 3, 0.01) as (_, up_port),  # (its SSE routes unused)
        _floor(up_port) as (floor, port),
        tempfile.TemporaryDirectory(prefix="llmo-floor-") as tmp,
    ):
        # what bench.overhead sends the floor: the upstream's own request
        request = _build_requests(up_port, port, "base-url")["direct"]
        wrk = shutil.which("wrk")

        def measure(duration: float) -> float:
            before = floor.cpu_seconds()
            if wrk:
                done = _wrk_throughput(port, request, duration, concurrency, others, Path(tmp))
            else:
                done = _loadgen(
                    "throughput",
                    port,
                    request,
                    duration,
                    others,
                    concurrency=concurrency,
                    warmup=0,
                )
            completed = int(done["completed_total"])
            return (floor.cpu_seconds() - before) / max(1, completed) * 1e6

        if floor_cpus:
            _pin(floor.pid, floor_cpus)
            os.sched_setaffinity(0, floor_cpus)
        try:
            measure(0.5)  # warm up
            yield measure
        finally:
            os.sched_setaffinity(0, mine)
