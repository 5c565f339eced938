"""Pooled HTTP/1.1 connections to upstreams, with framing-only response parsing.

An L{UpstreamConnection} carries one exchange at a time: the relay writes
the request head and body through it and receives the response's status,
headers and body chunks through the L{IUpstreamListener} callbacks. Response
framing is parsed by llhttp (via httptools), which is strict about the
smuggling vectors (CL with TE, duplicate lengths, bad chunk sizes). Nothing
else about the response is interpreted here.

L{UpstreamPool} keeps idle keep-alive connections per (scheme, address,
port, hostname) key. A connection goes back to the pool only when both the
request and the response ended cleanly and nothing arrived out of turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import httptools
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTCP
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from llmobserve.proxy._headers import LENGTH, RESPONSE_KINDS, TE, response_kind
from llmobserve.proxy._states import StateEnum, Transitions
from llmobserve.proxy._writes import WriteCoalescer, write_now

__all__ = [
    "IUpstreamListener",
    "UpstreamConnection",
    "UpstreamKey",
    "UpstreamPool",
    "UpstreamState",
]

#: (scheme, address to connect to, port, hostname for SNI and Host)
UpstreamKey = tuple[str, str, int, str]


class IUpstreamListener(Protocol):
    """What an exchange on an L{UpstreamConnection} reports back (the relay)."""

    def upstream_headers(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None: ...

    def upstream_body(self, data: bytes) -> None: ...

    def upstream_complete(self) -> None: ...

    def upstream_failed(self, kind: str, message: str) -> None: ...

    def upstream_writable(self, writable: bool) -> None: ...


class UpstreamFailure(Exception):
    """Connecting to an upstream failed; C{kind} is the error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@implementer(IPushProducer)
class _WriteBackpressure:
    """Registered on the upstream transport: tells the listener when to pause the client."""

    __slots__ = ("connection",)

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        listener = self.connection.listener
        if listener is not None:
            listener.upstream_writable(False)

    def resumeProducing(self) -> None:
        listener = self.connection.listener
        if listener is not None:
            listener.upstream_writable(True)

    def stopProducing(self) -> None:
        pass


class UpstreamState(StateEnum):
    """Where an L{UpstreamConnection} is in its life (see docs/ARCHITECTURE.md)."""

    CONNECTING = "connecting"  # built, the transport not made yet
    IDLE = "idle"  # connected, no exchange (new, or back in the pool)
    AWAIT_HEAD = "await_head"  # request head written, final response head not complete
    BODY = "body"  # final response head relayed, its body arriving
    DONE = "done"  # response complete, the listener told; settling
    CLOSED = "closed"  # aborted or lost: never used again


_CONNECTING, _IDLE, _AWAIT_HEAD, _BODY, _DONE, _CLOSED = UpstreamState
#: The legal moves; closing is idempotent and not a move (see L{UpstreamConnection.abort}).
UPSTREAM_TRANSITIONS: Transitions[UpstreamState] = Transitions(
    "UpstreamConnection",
    {
        _CONNECTING: [_IDLE],
        _IDLE: [_AWAIT_HEAD, _CLOSED],
        _AWAIT_HEAD: [_BODY, _CLOSED],
        _BODY: [_DONE, _CLOSED],
        _DONE: [_IDLE, _CLOSED],
        _CLOSED: [],
    },
)
#: Its C{move}, bound once: a move is made four times per exchange.
_move = UPSTREAM_TRANSITIONS.move


class UpstreamConnection(TwistedProtocol):
    """One HTTP/1.1 connection to an upstream, one exchange at a time.

    Its lifecycle is the one C{state} field (L{UpstreamState}, moves checked
    by L{UPSTREAM_TRANSITIONS}). What is not lifecycle stays in fields of
    its own, as h11 keeps keep-alive apart from its states: facts about the
    current exchange (HEAD request, framed by EOF, request body all written,
    may be reused) and read flow control, which can be paused in any state.
    """

    def __init__(self, pool: UpstreamPool, key: UpstreamKey, max_head_bytes: int) -> None:
        self.pool = pool
        self.key = key
        self.state = _CONNECTING
        self.listener: IUpstreamListener | None = None
        self.reused = False
        self._max_head_bytes = max_head_bytes
        self._parser: Any = None
        self._head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._request_done = True
        self._reusable = True
        self._head_request = False
        self._eof_framed = False
        self._read_paused = False
        self.idle_since = 0.0  # clock time it went back to the pool
        self._out: list[bytes] = []
        self.queued = False  # waiting in the WriteCoalescer

    # Twisted protocol

    def connectionMade(self) -> None:
        self.state = _move(self.state, _IDLE)
        transport: Any = self.transport
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except Exception:  # TLS wrappers without a socket yet
                pass
        transport.registerProducer(_WriteBackpressure(self), True)

    def dataReceived(self, data: bytes) -> None:
        coalescer = self.pool.coalescer
        coalescer.hold()
        try:
            self._received(data)
        finally:
            coalescer.release()

    def _received(self, data: bytes) -> None:
        state = self.state
        if self.listener is None or (state is not _AWAIT_HEAD and state is not _BODY):
            # Bytes out of turn (stray body after 204/HEAD, unsolicited data
            # on an idle connection): never trust this connection again.
            self._reusable = False
            self.abort()
            return
        if state is _AWAIT_HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes:
                self._fail("bad_upstream_response", "response headers too large")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("bad_upstream_response", "unexpected protocol upgrade")
        except httptools.HttpParserError as e:
            self._fail("bad_upstream_response", f"malformed response: {e}")

    def connectionLost(self, reason: Failure | None = None) -> None:
        state = self.state
        if state is not _CLOSED:
            self.state = _move(self.state, _CLOSED)
        self._reusable = False
        self.pool._forget(self)
        if self.listener is not None and (state is _AWAIT_HEAD or state is _BODY):
            listener, self.listener = self.listener, None
            if self._eof_framed and state is _BODY:
                # A response framed by the end of the connection ends here.
                listener.upstream_complete()
            else:
                kind = (
                    "tls_error"
                    if reason is not None and reason.check(SSL.Error, VerificationError)
                    else "upstream_reset"
                )
                listener.upstream_failed(
                    kind, "connection lost" if reason is None else _describe(reason)
                )

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.state is not _AWAIT_HEAD:
            # A second response in the same read: bytes out of turn.
            self.abort()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.state is not _AWAIT_HEAD:
            return  # a response out of turn, already aborted by on_message_begin
        status: int = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not
            # relayed; llhttp goes on to the final response.
            self._headers = []
            self._reason = b""
            return
        self.state = _move(self.state, _BODY)
        if not self._parser.should_keep_alive():
            self._reusable = False
        if status not in (204, 304) and not self._head_request:
            framed = False
            kinds = RESPONSE_KINDS
            for name, _ in self._headers:
                kind = kinds.get(name)
                if kind is None:
                    kind = response_kind(name)  # each spelling lower-cased once
                if kind == LENGTH or kind == TE:
                    framed = True
                    break
            if not framed:
                self._eof_framed = True
                self._reusable = False
        listener = self.listener
        if listener is not None:
            listener.upstream_headers(status, self._reason, self._headers)
        if self._head_request:
            # llhttp cannot be told that a HEAD response has no body: end the
            # exchange here and never reuse the connection.
            self._reusable = False
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        listener = self.listener
        if listener is not None:
            listener.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.state is not _BODY:
            return  # an interim response's end, or a HEAD response already ended
        self.state = _move(self.state, _DONE)
        listener, self.listener = self.listener, None
        if not self._request_done:
            # The upstream answered before taking the whole body: the rest of
            # the request can never be sent on this connection.
            self._reusable = False
        if listener is not None:
            listener.upstream_complete()
        self._settle()

    # Used by the relay

    def start(self, listener: IUpstreamListener, head: bytes, method: bytes) -> None:
        """Begin one exchange: write the request head."""
        self.state = _move(self.state, _AWAIT_HEAD)
        self.listener = listener
        if self._parser is None:
            # One parser per connection: a connection is reused only after a
            # response that llhttp saw end cleanly, which leaves its parser
            # at a message boundary, ready for the next one.
            self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._headers = []
        self._reason = b""
        self._eof_framed = False
        self._request_done = False
        self._head_request = method == b"HEAD"
        self._out.append(head)
        self.pool.coalescer.wrote(self)

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self.pool.coalescer.wrote(self)

    def flush(self) -> None:
        """Send what was written since the last flush (see L{WriteCoalescer})."""
        out = self._out
        if not out:
            return
        self._out = []
        if self.transport is not None and self.state is not _CLOSED:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def request_finished(self) -> None:
        """The request body has been written completely."""
        self._request_done = True

    def pause_reading(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self._read_paused:
            self._read_paused = True
            transport.pauseProducing()

    def resume_reading(self) -> None:
        transport: Any = self.transport
        if transport is not None and self._read_paused:
            self._read_paused = False
            transport.resumeProducing()

    def abort(self) -> None:
        """Close now: this connection never goes back to the pool (idempotent)."""
        self._reusable = False
        self.listener = None
        self._out = []
        self.pool._forget(self)
        if self.state is _CLOSED:
            return
        connected = self.state is not _CONNECTING
        self.state = _move(self.state, _CLOSED)
        transport: Any = self.transport
        if transport is not None and connected:
            transport.abortConnection()

    def _fail(self, kind: str, message: str) -> None:
        listener, self.listener = self.listener, None
        self.abort()
        if listener is not None:
            listener.upstream_failed(kind, message)

    def _settle(self) -> None:
        if self._reusable and self._request_done and self.state is _DONE:
            # A slow client may have left the socket paused: an idle pooled
            # connection must read (to notice EOF, and for its next response).
            self.resume_reading()
            self.state = _move(self.state, _IDLE)
            self.pool._release(self)
        else:
            self.abort()


class _OneConnection(Factory):
    """Hands out one prepared protocol; quiet (no start/stop log lines)."""

    noisy = False

    def __init__(self, protocol: UpstreamConnection) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return self._protocol


def _describe(reason: Failure) -> str:
    return reason.getErrorMessage()


class UpstreamPool:
    """Idle keep-alive connections per upstream key, and new connections on demand."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_idle_per_key: int = 64,
        max_head_bytes: int = 65536,
        tls_creator: Callable[[str], Any] | None = None,
        coalescer: WriteCoalescer | None = None,
    ) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_key
        self._max_head_bytes = max_head_bytes
        self._tls_creator = tls_creator
        self.coalescer = coalescer or WriteCoalescer()
        self._idle: dict[UpstreamKey, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._sweep_call: IDelayedCall | None = None

    def take_idle(self, key: UpstreamKey) -> UpstreamConnection | None:
        """An idle keep-alive connection for C{key}, or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.state is _IDLE and conn._reusable:
                conn.reused = True
                return conn
        return None

    def acquire(self, key: UpstreamKey) -> Deferred[UpstreamConnection]:
        """An idle connection for C{key} if there is one, else a new one."""
        conn = self.take_idle(key)
        return succeed(conn) if conn is not None else self.connect(key)

    def connect(self, key: UpstreamKey) -> Deferred[UpstreamConnection]:
        """A new connection for C{key} (TCP, and TLS for https)."""
        scheme, address, port, hostname = key
        reactor: IReactorTCP = self._reactor
        endpoint: Any
        if ":" in address:
            endpoint = TCP6ClientEndpoint(reactor, address, port, timeout=self._connect_timeout)
        else:
            endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=self._connect_timeout)
        if scheme == "https":
            if self._tls_creator is None:
                raise RuntimeError("no TLS context configured")
            endpoint = wrapClientTLS(self._tls_creator(hostname), endpoint)
        conn = UpstreamConnection(self, key, self._max_head_bytes)
        d: Deferred[Any] = endpoint.connect(_OneConnection(conn))

        def connected(proto: UpstreamConnection) -> UpstreamConnection:
            self._all.add(proto)
            return proto

        d.addCallback(connected)
        return d

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            conn.abort()
            return
        idle.append(conn)
        conn.idle_since = self._reactor.seconds()
        if self._sweep_call is None:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        # One timer for the whole pool, not one per exchange: an idle
        # connection is closed between 1 and 1.25 idle timeouts after its
        # last use.
        self._sweep_call = self._reactor.callLater(self._idle_timeout / 4, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than the idle timeout."""
        self._sweep_call = None
        cutoff = self._reactor.seconds() - self._idle_timeout
        for key, idle in list(self._idle.items()):
            # Taken from the end, returned to the end: the oldest come first.
            expired = 0
            while expired < len(idle) and idle[expired].idle_since <= cutoff:
                expired += 1
            stale, idle[:expired] = idle[:expired], []
            for conn in stale:
                conn.abort()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._arm_sweep()

    def _forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Abort every connection (shutdown)."""
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
