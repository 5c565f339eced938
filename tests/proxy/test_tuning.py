"""C{--no-tuning}: one switch for every process-wide change, checked on the
service tree that C{makeService} builds, in this process.

The four steps (own poll step, malloc arena cap, C{gc.freeze},
C{malloc_trim}) are replaced by recorders so that the test process itself
is left as it is; the tree is started for real on a loopback port, so the
after-listening step runs where the proxy runs it.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from llmobserve.proxy import _tap, _tuning

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the tuning steps were asked to do, in order, instead of doing it."""
    calls: list[str] = []

    def record(name: str, result: bool = True) -> Any:
        def step(*_args: Any) -> bool:
            calls.append(name)
            return result

        return step

    monkeypatch.setattr(_tuning, "install_lean_poll", record("poll"))
    monkeypatch.setattr(_tuning, "limit_malloc_arenas", record("malloc_arenas"))
    monkeypatch.setattr(gc, "freeze", record("gc_freeze"))  # the gc module _tuning calls
    monkeypatch.setattr(_tuning, "release_free_memory", record("malloc_trim"))
    return calls


def build(*argv: str) -> Any:
    options = _tap.Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--no-events", *argv])
    return _tap.makeService(options)


def proxy_service(top: Any) -> Any:
    (found,) = [child for child in top if isinstance(child, _tap.ProxyService)]
    return found


async def listened(top: Any) -> None:
    """Start the tree and wait until the proxy's port is bound."""
    top.startService()
    for _ in range(200):
        if proxy_service(top)._port is not None:
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the proxy did not listen")


@pytest_twisted.ensureDeferred
async def test_the_service_tree_tunes_the_process_by_default(steps: list[str]) -> None:
    """Without the switch: the poll step and the arena cap while the tree is
    built, C{gc.freeze} and C{malloc_trim} once the port is bound."""
    top = build()
    assert steps == ["poll", "malloc_arenas"]
    try:
        await listened(top)
        assert steps == ["poll", "malloc_arenas", "gc_freeze", "malloc_trim"]
        assert proxy_service(top)._tuning.applied == steps
    finally:
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_no_tuning_leaves_the_process_alone(steps: list[str]) -> None:
    """With C{--no-tuning} none of the four runs, before or after listening."""
    top = build("--no-tuning")
    try:
        await listened(top)
        assert steps == []
        assert proxy_service(top)._tuning.applied == []
    finally:
        await top.stopService()


def test_a_step_the_platform_refuses_is_not_counted(
    steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that could not apply (no epoll, C{MALLOC_ARENA_MAX} set) is not
    listed as applied."""
    monkeypatch.setattr(_tuning, "limit_malloc_arenas", lambda: False)
    tuning = _tuning.ProcessTuning(enabled=True)
    tuning.before_services(object())
    assert tuning.applied == ["poll"]
