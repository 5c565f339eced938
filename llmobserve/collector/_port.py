"""One port, two protocols: the link (after the C{LLMO\\x01} magic) and HTTP.

L{PortSwitchFactory} builds a L{PortSwitch} per connection. It holds the
first bytes until they either spell the magic, so the connection is a link,
or cannot, so it is HTTP; then it builds that protocol on the same transport
and replays what it held. A connection that stays silent before deciding is
closed after a deadline, so a half-open socket holds nothing for long.

On an C{ssl:} port the factory answers ALPN with C{http/1.1}: Twisted fails
the handshake of every client that offers ALPN (browsers, curl) when the
wrapped factory names no protocol. The link's clients offer none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from llmobserve.events import MAGIC

from ._link import StreamTransport

__all__ = ["PortSwitch", "PortSwitchFactory"]


class PortSwitch(Protocol):
    """Decides between link and HTTP from the first bytes, then forwards."""

    def __init__(
        self,
        addr: IAddress | None,
        make_link: Callable[[], Protocol],
        make_http: Callable[[IAddress | None], Protocol | None],
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._addr = addr
        self._make_link = make_link
        self._make_http = make_http
        self._clock = clock
        self._timeout = timeout
        self._held = b""
        self._inner: Protocol | None = None
        self._deadline: IDelayedCall | None = None

    @property
    def inner(self) -> Protocol | None:
        """The protocol chosen, once the first bytes have decided."""
        return self._inner

    def connectionMade(self) -> None:
        self._deadline = self._clock.callLater(self._timeout, self._expire)

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        held = self._held + data
        if len(held) < len(MAGIC) and MAGIC.startswith(held):
            self._held = held
            return
        self._held = b""
        self._cancel_deadline()
        if held.startswith(MAGIC):
            inner = self._make_link()
            held = held[len(MAGIC) :]
        else:
            maybe = self._make_http(self._addr)
            if maybe is None:
                assert self.transport is not None
                self.transport.loseConnection()
                return
            inner = maybe
        self._inner = inner
        inner.makeConnection(self.transport)
        if held:
            inner.dataReceived(held)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._inner is not None:
            self._inner.connectionLost(reason)

    def _expire(self) -> None:
        self._deadline = None
        transport = cast(StreamTransport | None, self.transport)
        if self._inner is None and transport is not None:
            transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


@implementer(IProtocolNegotiationFactory)
class PortSwitchFactory(Factory):
    """Builds a L{PortSwitch} per connection.

    @param make_link: a new link protocol (not yet connected).
    @param http_factory: the factory (a C{Site}) whose protocols serve HTTP.
    @param timeout: seconds a connection may take to send its first bytes.
    """

    noisy = False

    def __init__(
        self,
        make_link: Callable[[], Protocol],
        http_factory: Factory[Any],
        clock: IReactorTime,
        timeout: float = 30.0,
    ) -> None:
        self._make_link = make_link
        self._http = http_factory
        self._clock = clock
        self._timeout = timeout

    def startFactory(self) -> None:
        self._http.doStart()

    def stopFactory(self) -> None:
        self._http.doStop()

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN on a TLS port: HTTP/1.1 (the link's clients offer none)."""
        return [b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return PortSwitch(addr, self._make_link, self._build_http, self._clock, self._timeout)

    def _build_http(self, addr: IAddress | None) -> Protocol | None:
        return cast(Protocol | None, self._http.buildProtocol(addr))
