"""A TLS port that answers plain text with a hint instead of silence.

Twisted's C{ssl:} endpoint hands every connection to OpenSSL, which reads
a plain-text request (C{curl http://host:8443/health}, a CLI given
C{--collector http://...}, an SDK given C{proxy_url="http://..."}) as a
broken handshake and closes the connection: the client sees an empty
reply and no reason. Every TLS connection begins with a handshake
record, whose first byte is 0x16; a connection whose first byte is
anything else gets a plain-text C{400} saying the port speaks TLS (the
error contract's JSON, C{X-LLMObserve-Error: tls_required}), and is
closed. The collector's port and the proxy's both do this.

L{TLSHintReactor} wraps the reactor given to C{serverFromString}: its
C{listenSSL} is the reactor's own (a L{TLSMemoryBIOFactory} on a TCP
port) with L{TLSOrHintFactory} in front, and the rest is the reactor's.
"""

from __future__ import annotations

import json
from typing import Any, Final

from twisted.internet.interfaces import IAddress, IListeningPort, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

__all__ = ["TLSHintReactor", "TLSOrHintFactory", "plain_text_answer"]

#: The first byte of every TLS connection: a record of type handshake.
_HANDSHAKE: Final = 0x16


def plain_text_answer(hint: str) -> bytes:
    """What a plain-text client gets: the error contract's JSON with
    C{hint} (an HTTP request most likely; anything else reads the words
    all the same)."""
    body = json.dumps({"error": {"type": "tls_required", "message": hint}}).encode()
    return (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"Content-Type: application/json\r\n"
        b"X-LLMObserve-Error: tls_required\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class TLSOrHint(Protocol):
    """Passes a TLS connection to its TLS protocol, from the first byte on;
    answers any other with C{answer} (L{plain_text_answer}) and closes it.

    The TLS protocol is connected at once (its application protocol's
    deadline for the first bytes runs from the start), and told when the
    connection is lost either way.
    """

    def __init__(self, tls: Protocol, answer: bytes) -> None:
        self._tls = tls
        self._answer = answer
        self._first = True
        self._plain = False

    def makeConnection(self, transport: ITransport) -> None:
        Protocol.makeConnection(self, transport)
        self._tls.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._plain:
            return
        if self._first:
            self._first = False
            if data[0] != _HANDSHAKE:
                self._plain = True
                assert self.transport is not None
                self.transport.write(self._answer)
                self.transport.loseConnection()
                return
        self._tls.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tls.connectionLost(reason)


class TLSOrHintFactory(Factory):
    """Builds a L{TLSOrHint} around each protocol of a TLS factory."""

    noisy = False

    def __init__(self, tls: TLSMemoryBIOFactory, answer: bytes) -> None:
        self._tls = tls
        self._answer = answer

    def startFactory(self) -> None:
        self._tls.doStart()

    def stopFactory(self) -> None:
        self._tls.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        tls = self._tls.buildProtocol(addr)
        return None if tls is None else TLSOrHint(tls, self._answer)


class TLSHintReactor:
    """The reactor, but C{listenSSL} answers plain text with C{hint} (see
    the module's docstring); give it to C{serverFromString} for an
    C{ssl:} endpoint."""

    def __init__(self, reactor: Any, hint: str) -> None:
        self._reactor = reactor
        self._answer = plain_text_answer(hint)

    def listenSSL(
        self,
        port: int,
        factory: Factory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        tls = TLSMemoryBIOFactory(contextFactory, False, factory)
        listening: IListeningPort = self._reactor.listenTCP(
            port, TLSOrHintFactory(tls, self._answer), backlog, interface
        )
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
