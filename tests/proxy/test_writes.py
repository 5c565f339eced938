"""Write-through and coalescing (llmobserve/proxy/_writes.py).

The first test is the tripwire for the tcp.Connection internals that
write_now reads: if Twisted renames them, it fails here, not in production.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, cast

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred

from llmobserve.proxy._writes import WriteCoalescer, write_now


class _Recorder:
    def __init__(self) -> None:
        self.queued = False
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_writes_made_while_holding_are_flushed_once_at_release() -> None:
    coalescer = WriteCoalescer()
    target = _Recorder()
    coalescer.hold()
    coalescer.wrote(target)
    coalescer.wrote(target)
    assert target.flushes == 0
    coalescer.release()
    assert target.flushes == 1


def test_writes_outside_a_read_flush_at_once() -> None:
    coalescer = WriteCoalescer()
    target = _Recorder()
    coalescer.wrote(target)
    assert target.flushes == 1


def test_nested_holds_flush_at_the_outermost_release() -> None:
    coalescer = WriteCoalescer()
    target = _Recorder()
    coalescer.hold()
    coalescer.hold()
    coalescer.wrote(target)
    coalescer.release()
    assert target.flushes == 0
    coalescer.release()
    assert target.flushes == 1


@pytest_twisted.inlineCallbacks
def test_write_now_sends_in_order_and_queues_what_the_socket_cannot_take() -> Generator[
    Deferred[Any] | None, Any, None
]:
    """Bytes arrive in order whether sent at once or left to Twisted's buffer."""
    received = bytearray()
    done: Deferred[None] = Deferred()
    total = 8 * 1024 * 1024

    class Sink(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.extend(data)
            if len(received) >= total + 5 and not done.called:
                done.callback(None)

    server = reactor.listenTCP(
        0,
        cast(protocol.ServerFactory, protocol.ServerFactory.forProtocol(Sink)),
        interface="127.0.0.1",
    )
    client = yield protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
        "127.0.0.1", cast(IPv4Address, server.getHost()).port
    )
    try:
        write_now(client.transport, b"first")
        for _ in range(8):  # more than a socket buffer: the rest is queued
            write_now(client.transport, b"x" * (1024 * 1024))
        yield done
        assert bytes(received[:5]) == b"first"
        assert len(received) == total + 5
    finally:
        client.transport.loseConnection()
        yield server.stopListening()
