"""The one-port switch: the LLMO magic makes a link, anything else is HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from llmobserve.collector._port import PortSwitch, PortSwitchFactory
from llmobserve.events._codec import MAGIC


class Recorder(Protocol):
    """Remembers what it was given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class HTTPRecorderFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.started = 0

    def startFactory(self) -> None:
        self.started += 1

    def buildProtocol(self, addr: Any) -> Recorder:
        p = Recorder("http")
        self.built.append(p)
        return p


def connect(
    clock: Clock,
) -> tuple[PortSwitch, StringTransport, list[Recorder], HTTPRecorderFactory]:
    links: list[Recorder] = []

    def make_link() -> Recorder:
        p = Recorder("link")
        links.append(p)
        return p

    http = HTTPRecorderFactory()
    factory = PortSwitchFactory(make_link, http, clock, timeout=5.0)
    factory.doStart()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    assert http.started == 1
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    assert isinstance(proto, PortSwitch)
    transport = StringTransport()
    proto.makeConnection(transport)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    return proto, transport, links, http


@pytest.mark.parametrize("split", range(1, len(MAGIC) + 3))
def test_magic_split_anywhere_makes_a_link(split: int) -> None:
    """The magic, split at any byte, selects the link; what follows is replayed."""
    clock = Clock()
    proto, transport, links, http = connect(clock)
    data = MAGIC + b"\x00\x00\x00\x02ab"
    proto.dataReceived(data[:split])
    proto.dataReceived(data[split:])
    assert [p.name for p in links] == ["link"] and http.built == []
    assert links[0].made and links[0].transport is transport
    assert links[0].data == b"\x00\x00\x00\x02ab"
    proto.connectionLost(Failure(ConnectionError()))
    assert links[0].lost is not None


@pytest.mark.parametrize(
    "first", [b"GET /health HTTP/1.1\r\n", b"L", b"LLMO\x02", b"LOCK / HTTP/1.1\r\n", b"\x00"]
)
def test_anything_else_is_http(first: bytes) -> None:
    """Bytes that are not the magic go to HTTP, replayed from the first byte."""
    clock = Clock()
    proto, _transport, links, http = connect(clock)
    proto.dataReceived(first)
    if MAGIC.startswith(first):
        assert http.built == []  # still undecided: a prefix of the magic
        proto.dataReceived(b"X")
        first += b"X"
    assert links == []
    assert [p.name for p in http.built] == ["http"]
    assert http.built[0].data == first
    proto.dataReceived(b"more")
    assert http.built[0].data == first + b"more"


def test_silent_connection_closed() -> None:
    """A connection that sends nothing is aborted after the deadline."""
    clock = Clock()
    proto, transport, _links, _http = connect(clock)
    proto.dataReceived(b"LL")
    clock.advance(4.9)
    assert not transport.disconnecting and not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected or transport.disconnecting


def test_deadline_cancelled_once_decided() -> None:
    """After the switch decides, its deadline no longer applies."""
    clock = Clock()
    proto, transport, _links, _http = connect(clock)
    proto.dataReceived(MAGIC)
    clock.advance(60)
    assert not transport.disconnecting and not transport.disconnected
    assert clock.getDelayedCalls() == []


def test_alpn_names_http_1_1_so_browsers_can_connect_over_tls() -> None:
    """On an C{ssl:} port Twisted refuses every handshake that offers ALPN
    (browsers, curl) unless the factory names a protocol: it names HTTP/1.1."""
    from twisted.internet.interfaces import IProtocolNegotiationFactory
    from zope.interface.verify import verifyObject

    factory = PortSwitchFactory(Protocol, Factory(), Clock())
    assert verifyObject(IProtocolNegotiationFactory, factory)
    assert factory.acceptableProtocols() == [b"http/1.1"]
