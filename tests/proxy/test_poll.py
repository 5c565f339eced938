"""The lean epoll poll step: same dispatch as Twisted's, no log context.

Each test builds its own C{EPollReactor} (never run, only polled with a
zero timeout) so the process-wide reactor is untouched. The tripwire for
the Twisted internals the lean step reads is C{test_compat.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from llmobserve.events._turns import ReactorTurns
from llmobserve.proxy._poll import install_lean_poll


def _dispose(reactor: Any) -> None:
    reactor.removeAll()
    reactor.removeReader(reactor.waker)
    reactor.waker.connectionLost(None)
    if hasattr(reactor, "_poller"):
        reactor._poller.close()


@pytest.fixture
def lean_reactor(epoll_reactor: Any) -> Any:
    assert install_lean_poll(epoll_reactor)
    return epoll_reactor


class _Reader:
    """A readable end of a socket pair that records what happens to it."""

    def __init__(self, sock: socket.socket, fail_read: bool = False, fail_lost: bool = False):
        self.sock = sock
        self.fail_read = fail_read
        self.fail_lost = fail_lost
        self.read: list[bytes] = []
        self.lost: list[Failure] = []
        self.drops: _Reader | None = None  # removed from the reactor after our read
        self.reactor: Any = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        data = self.sock.recv(100)
        if self.fail_read:
            raise ValueError("doRead failed")
        self.read.append(data)
        if self.drops is not None:
            self.reactor.removeReader(self.drops)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.fail_lost:
            raise RuntimeError("connectionLost failed too")


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


@pytest.fixture
def epoll_reactor(pairs: list[Any]) -> Iterator[Any]:
    """A fresh epoll reactor, disposed of before the sockets it watched close."""
    reactor = EPollReactor()
    try:
        yield reactor
    finally:
        _dispose(reactor)


def _reader(reactor: Any, pairs: list[Any], **fail: bool) -> tuple[_Reader, socket.socket]:
    ours, theirs = socket.socketpair()
    pairs.append((ours, theirs))
    ours.setblocking(False)
    reader = _Reader(ours, **fail)
    reader.reactor = reactor
    reactor.addReader(reader)
    return reader, theirs


def test_installs_on_an_epoll_reactor_as_both_poll_and_iteration(epoll_reactor: Any) -> None:
    assert install_lean_poll(epoll_reactor) is True
    assert epoll_reactor.doIteration is epoll_reactor.doPoll
    assert "doIteration" in vars(epoll_reactor)


def test_ready_descriptors_are_read_and_idle_ones_are_not(
    lean_reactor: Any, pairs: list[Any]
) -> None:
    ready, ready_peer = _reader(lean_reactor, pairs)
    idle, _ = _reader(lean_reactor, pairs)
    ready_peer.sendall(b"hello")
    lean_reactor.doIteration(0)
    assert ready.read == [b"hello"]
    assert idle.read == []


def test_a_failing_read_loses_that_connection_and_the_turn_goes_on(
    lean_reactor: Any, pairs: list[Any]
) -> None:
    broken, broken_peer = _reader(lean_reactor, pairs, fail_read=True, fail_lost=True)
    fine, fine_peer = _reader(lean_reactor, pairs)
    broken_peer.sendall(b"x")
    fine_peer.sendall(b"y")
    logged: list[Any] = []
    globalLogPublisher.addObserver(cast(ILogObserver, logged.append))
    try:
        lean_reactor.doIteration(0)
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, logged.append))
    # Twisted's own handling: the reader is dropped with the error as reason...
    assert [f.type for f in broken.lost] == [ValueError]
    assert broken.fileno() not in lean_reactor._selectables
    # ...its raising connectionLost is logged and does not stop the other descriptor
    failures = [e["log_failure"].type for e in logged if "log_failure" in e]
    assert RuntimeError in failures
    assert fine.read == [b"y"]
    assert fine.lost == []


def test_a_descriptor_removed_earlier_in_the_turn_is_skipped(
    lean_reactor: Any, pairs: list[Any]
) -> None:
    first, first_peer = _reader(lean_reactor, pairs)
    second, second_peer = _reader(lean_reactor, pairs)
    first.drops, second.drops = second, first  # whichever is read first drops the other
    first_peer.sendall(b"a")
    second_peer.sendall(b"b")
    lean_reactor.doIteration(0)
    assert len(first.read) + len(second.read) == 1


def test_other_reactors_and_a_second_install_are_left_alone(epoll_reactor: Any) -> None:
    select_reactor = SelectReactor()
    try:
        assert install_lean_poll(select_reactor) is False
        assert "doIteration" not in vars(select_reactor)
    finally:
        _dispose(select_reactor)
    assert install_lean_poll(epoll_reactor) is True
    lean = epoll_reactor.doIteration
    assert install_lean_poll(epoll_reactor) is False
    assert epoll_reactor.doIteration is lean


def test_reactor_turns_wrap_the_lean_step(lean_reactor: Any) -> None:
    turns = ReactorTurns(lean_reactor)
    assert turns.install()
    lean_reactor.doIteration(0)
    lean_reactor.doIteration(0)
    assert turns.turn == 2
    turns.uninstall()
    assert "doIteration" in vars(lean_reactor)  # the lean step, not Twisted's
