"""ParsePool on the real reactor with real threads: how items become jobs."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from llmobserve.events._pool import ParsePool

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """The pool's work and callbacks: records each job's items; a job can be held."""

    def __init__(self) -> None:
        self.jobs: list[list[str]] = []
        self.results: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.failures: list[Failure] = []

    def work(self, items: list[str]) -> list[str]:
        self.jobs.append(list(items))
        self.hold.wait(10)
        return items

    def done(self, results: list[str]) -> None:
        self.results.append(results)

    def failed(self, items: list[str], failure: Failure) -> None:
        self.failures.append(failure)


async def _until(condition: Any, limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in time")


async def _jobs(groups: list[str], **pool_options: Any) -> list[list[str]]:
    """The jobs a one-thread pool makes of C{groups} of items, each group
    submitted at once and the next only when the pool is idle again."""
    rec = Recorder()
    pool: ParsePool[str, str] = ParsePool(
        reactor, rec.work, rec.done, rec.failed, workers=1, **pool_options
    )
    pool.start()
    try:
        for group in groups:
            for item in group:
                assert pool.try_submit(item)
            await _until(lambda: pool.in_flight == 0)
    finally:
        pool.stop()
    assert not rec.failures
    return rec.jobs


@pytest_twisted.ensureDeferred
async def test_light_load_gathers_items_into_one_job() -> None:
    assert await _jobs(["abc"], gather=0.05) == [["a", "b", "c"]]


@pytest_twisted.ensureDeferred
async def test_items_that_waited_for_a_busy_thread_still_gather() -> None:
    """When a job comes back, what arrived meanwhile is not handed over at
    once: at c=1 that made jobs of one or two items, each costing thread
    hand-offs and reactor wake-ups. It waits for the gather window, and
    whatever comes in that window joins it."""
    rec = Recorder()
    came_back: Deferred[None] = Deferred()

    def done(results: list[str]) -> None:
        rec.results.append(results)
        if results == ["a"]:
            # a turn later: after the pool has seen the job come back
            reactor.callLater(0, came_back.callback, None)

    pool: ParsePool[str, str] = ParsePool(
        reactor, rec.work, done, rec.failed, workers=1, gather=0.3
    )
    pool.start()
    try:
        rec.hold.clear()
        pool.try_submit("a")
        await _until(lambda: rec.jobs == [["a"]])
        pool.try_submit("b")  # the only thread is busy: b waits
        rec.hold.set()
        await came_back
        pool.try_submit("c")
        await _until(lambda: pool.in_flight == 0)
        assert rec.jobs == [["a"], ["b", "c"]]
        assert not rec.failures
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_batch_goes_at_once_without_waiting_for_the_window() -> None:
    assert await _jobs(["xyz"], gather=30.0, batch=3) == [["x", "y", "z"]]


@pytest_twisted.ensureDeferred
async def test_without_a_gather_window_each_item_goes_at_once() -> None:
    assert await _jobs(["a", "b"], gather=0.0) == [["a"], ["b"]]
