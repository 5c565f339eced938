"""ReactorTurns: event threads wait for the reactor's next turn, never longer than max_wait."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from llmobserve.events._turns import ReactorTurns


class FakeReactor:
    def __init__(self) -> None:
        self.polls: list[float | None] = []

    def doIteration(self, delay: float | None) -> None:
        self.polls.append(delay)


def _pause_in_thread(turns: ReactorTurns) -> tuple[threading.Thread, list[float]]:
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        turns.pause()
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def _until(condition: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_each_poll_is_a_turn_and_still_polls() -> None:
    fake = FakeReactor()
    turns = ReactorTurns(fake)
    assert turns.install()
    fake.doIteration(0.5)
    fake.doIteration(None)
    assert turns.turn == 2
    assert fake.polls == [0.5, None]


def test_a_paused_thread_wakes_at_the_next_turn() -> None:
    fake = FakeReactor()
    turns = ReactorTurns(fake, max_wait=30.0)
    turns.install()
    fake.doIteration(0)  # the loop is running
    thread, took = _pause_in_thread(turns)
    _until(lambda: turns._waiting == 1)
    fake.doIteration(0)
    thread.join(5)
    assert not thread.is_alive()
    assert took[0] < 5


def test_a_pause_ends_after_max_wait_without_a_turn() -> None:
    fake = FakeReactor()
    turns = ReactorTurns(fake, max_wait=0.05)
    turns.install()
    fake.doIteration(0)
    thread, took = _pause_in_thread(turns)
    thread.join(5)
    assert 0.04 <= took[0] < 5
    assert turns.turn == 1


def test_uninstall_restores_the_reactor_and_releases_waiters() -> None:
    fake = FakeReactor()
    turns = ReactorTurns(fake, max_wait=30.0)
    turns.install()
    fake.doIteration(0)
    thread, took = _pause_in_thread(turns)
    _until(lambda: turns._waiting == 1)
    turns.uninstall()
    thread.join(5)
    assert took and took[0] < 5
    assert "doIteration" not in vars(fake)
    fake.doIteration(1.0)
    assert fake.polls == [0, 1.0]


def test_before_the_first_turn_a_pause_returns_at_once() -> None:
    """A reactor whose loop never calls doIteration (asyncio's) must not
    make every pause wait max_wait."""
    turns = ReactorTurns(FakeReactor(), max_wait=30.0)
    assert turns.install()
    start = time.monotonic()
    turns.pause()
    assert time.monotonic() - start < 5


def test_without_doIteration_install_is_a_no_op_and_pause_returns_at_once() -> None:
    turns = ReactorTurns(object(), max_wait=30.0)
    assert not turns.install()
    start = time.monotonic()
    turns.pause()
    assert time.monotonic() - start < 5
    turns.uninstall()


@pytest_twisted.ensureDeferred
async def test_on_the_running_reactor_a_pause_ends_within_a_turn() -> None:
    turns = ReactorTurns(reactor, max_wait=30.0)
    assert turns.install()
    try:
        thread, took = _pause_in_thread(turns)
        while thread.is_alive():
            await deferLater(reactor, 0.01, lambda: None)
        assert took[0] < 5
    finally:
        turns.uninstall()
    assert "doIteration" not in vars(reactor)


class Ticks:
    """A clock that moves C{step} seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_long_wait_for_a_busy_reactor_lets_threads_run_free() -> None:
    """A pause that waited busy_wait or more while the reactor thread used
    the CPU: for free_for, pauses return at once (a saturated reactor's
    long turns would make every pause cost milliseconds)."""
    fake = FakeReactor()
    turns = ReactorTurns(fake, max_wait=0.01, busy_wait=0.001, free_for=60.0)
    turns.install()
    fake.doIteration(0)
    turns._clock = Ticks(0.002)
    turns._reactor_cpu = Ticks(0.002)  # the reactor ran throughout
    turns.pause()  # waits max_wait: no turn comes
    turns.max_wait = 30.0
    start = time.monotonic()
    turns.pause()
    assert time.monotonic() - start < 5


def test_a_long_wait_for_an_idle_reactor_changes_nothing() -> None:
    """The reactor asleep in its poll (no CPU used) is not busy: pauses go on."""
    fake = FakeReactor()
    turns = ReactorTurns(fake, max_wait=0.05, busy_wait=0.001, free_for=60.0)
    turns.install()
    fake.doIteration(0)
    turns._clock = Ticks(0.002)
    turns._reactor_cpu = lambda: 1.0
    turns.pause()
    thread, took = _pause_in_thread(turns)
    thread.join(5)
    assert took[0] >= 0.04


def test_two_on_one_reactor_uninstall_in_any_order() -> None:
    """A second ReactorTurns wraps the first; taking the first off first
    leaves the second's wrapper in place, and the reactor still polls."""
    fake = FakeReactor()
    first, second = ReactorTurns(fake), ReactorTurns(fake)
    first.install()
    second.install()
    first.uninstall()
    fake.doIteration(0.1)
    assert second.turn == 1
    second.uninstall()
    fake.doIteration(0.2)
    assert fake.polls == [0.1, 0.2]
    assert "doIteration" in vars(fake)  # the first's wrapper, still calling through
