"""A lean HTTP/1.1 server for the proxy resource: llhttp framing, no twisted.web parsing.

twisted.web's request parsing (line by line, C{Headers} normalisation,
form parsing) costs more per request than the whole relay. L{ProxyChannel}
parses only the framing, with llhttp (via httptools; strict about CL/TE
conflicts, bad chunk sizes and header syntax), keeps request headers as
raw pairs, and hands each request to the same L{ProxyResource} that a
twisted.web C{Site} would: C{begin_streaming} for forwarding routes (the
body streams as it arrives), C{render} for the proxy's own routes.

L{ChannelRequest} implements the part of twisted.web's C{Request} that the
resource and the relay use, so both servers drive one relay.

One request at a time per connection: a pipelined request is parsed and
held (its body bounded by pausing the socket) until the response before
it is finished. Deadlines (request head, body idle, keep-alive idle) are
swept by one timer, not armed per request.
"""

from __future__ import annotations

import io
from collections import deque
from http import HTTPStatus
from typing import Any

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import RESPONSES
from zope.interface import implementer

from llmobserve.proxy._errors import error_body, prepare_error
from llmobserve.proxy._headers import EXPECT, HOST, LENGTH, REQUEST_KINDS, TE, request_kind
from llmobserve.proxy._states import StateEnum, Transitions
from llmobserve.proxy._writes import WriteCoalescer, write_now

__all__ = ["ChannelRequest", "ChannelState", "ProxyChannel", "ProxyServerFactory"]

_log = Logger()
#: Reason phrases: twisted.web's table, and the standard library's for the
#: codes it lacks (429, 431, 508...).
_REASONS: dict[int, bytes] = {
    **{status.value: status.phrase.encode() for status in HTTPStatus},
    **RESPONSES,
}
_NO_BODY = frozenset({204, 304})
_OWN_BODY_LIMIT = 4 * 1024 * 1024  # /spans and friends: bodies read whole
_BODY_PROGRESS = 1024  # request-body bytes that move the body deadline on
_NEVER = float("inf")


class _ResponseHeaders:
    """The slice of twisted.web's C{Headers} the relay uses, as a plain list."""

    __slots__ = ("pairs",)

    def __init__(self) -> None:
        self.pairs: list[tuple[bytes, bytes]] = []

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        self.pairs.append((name, value))

    def setRawHeaders(self, name: bytes | str, values: list[bytes]) -> None:
        key = name.encode() if isinstance(name, str) else name
        lower = key.lower()
        self.pairs = [(n, v) for n, v in self.pairs if n.lower() != lower]
        self.pairs.extend((key, v) for v in values)

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        lower = name.lower()
        found = [v for n, v in self.pairs if n.lower() == lower]
        return found or default

    def hasHeader(self, name: bytes) -> bool:
        lower = name.lower()
        for n, _ in self.pairs:
            if n.lower() == lower:
                return True
        return False


class _RequestHeaders:
    """Read access to the raw request headers, twisted.web style."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.pairs = pairs

    def getAllRawHeaders(self) -> Any:
        for name, value in self.pairs:
            yield name, [value]

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        lower = name.lower()
        found = [v for n, v in self.pairs if n.lower() == lower]
        return found or default


class ChannelRequest:
    """One request on a L{ProxyChannel}; quacks like twisted.web's C{Request}."""

    reports_client_gone = True  # the channel calls the receiver's client_gone itself
    _finish_waiters: list[Deferred[None]] | None = None  # notifyFinish (own routes only)
    # Immutable defaults live on the class: an instance sets only what
    # changes (a dozen attribute stores fewer per request).
    code = 200
    code_message: bytes | None = None
    content: Any = None
    receiver: Any = None
    finished = False
    _disconnected = False
    started_writing = False
    chunked = False
    keep_alive = True
    body_done = False
    held: list[bytes] | None = None  # body bytes of a pipelined request not yet begun
    expects_continue = False
    producer: Any = None
    queued = False  # waiting in the WriteCoalescer

    def __init__(
        self,
        channel: ProxyChannel,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        hosts: list[bytes] | None = None,
    ) -> None:
        self.channel: ProxyChannel | None = channel
        self.transport = channel.transport
        self.method = method
        self.uri = uri
        self.clientproto = version
        self.path = uri.split(b"?", 1)[0]
        self.prepath: list[bytes] = []
        segments = self.path[1:].split(b"/")
        if b"%" in self.path:
            from urllib.parse import unquote_to_bytes

            segments = [unquote_to_bytes(s) for s in segments]
        self.postpath: list[bytes] = segments
        self.raw_headers: list[tuple[bytes, bytes]] = headers if headers is not None else []
        #: Every C{Host} value, gathered while the framing was checked (the
        #: resource's Host guard reads them instead of scanning again).
        self.host_values = hosts
        self.responseHeaders = _ResponseHeaders()
        self._out: list[bytes] = []

    # twisted.web.http.Request, the parts used

    @property
    def requestHeaders(self) -> _RequestHeaders:
        """The request's headers, twisted.web style (the proxy's own routes;
        the relay reads C{raw_headers}), made when asked."""
        return _RequestHeaders(self.raw_headers)

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's parameters, as twisted.web's C{Request.args} (own
        routes only; parsed once, so a change to them is kept)."""
        args: dict[bytes, list[bytes]] | None = self.__dict__.get("_args")
        if args is None:
            from urllib.parse import parse_qs

            _, _, query = self.uri.partition(b"?")
            args = self.__dict__["_args"] = parse_qs(query, keep_blank_values=True)
        return args

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        self.responseHeaders.setRawHeaders(
            name, [value.encode() if isinstance(value, str) else value]
        )

    def getHeader(self, name: bytes) -> bytes | None:
        found = self.requestHeaders.getRawHeaders(name)
        return None if found is None else found[-1]

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return
        channel = self.channel
        if channel is None:
            return
        out = self._out
        if not self.started_writing:
            self.started_writing = True
            out.append(channel.head_bytes(self))
            if self.method == b"HEAD" or self.code in _NO_BODY:
                self.write = _discard  # type: ignore[method-assign]  # a HEAD answer has no body to send
                channel.factory.coalescer.wrote(self)
                return
        if data:
            if self.chunked:
                out.append(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                out.append(data)
        channel.factory.coalescer.wrote(self)

    def flush(self) -> None:
        """Send what was written since the last flush (see L{WriteCoalescer})."""
        out = self._out
        if not out:
            return
        self._out = []
        channel = self.channel
        if channel is not None and channel.transport is not None:
            write_now(channel.transport, out[0] if len(out) == 1 else b"".join(out))

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        if not self.started_writing:
            self.write(b"")
        if self.chunked:
            self._out.append(b"0\r\n\r\n")
        self.flush()  # now: request_done may close the connection
        self.finished = True
        if self._finish_waiters:
            self._finished_with(None)
        if self.channel is not None:
            self.channel.request_done(self)

    def finish_and_close(self) -> None:
        """Finish now, though the body may still be arriving; close afterwards."""
        self.keep_alive = False
        if self.channel is not None:
            self.channel.stop_reading_requests()
        self.finish()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        """As twisted.web's: fires when the response is finished, fails when
        the client goes first. For the proxy's own routes (C{/api}); the
        relay hears of a lost client through its receiver's C{client_gone}."""
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        elif self._disconnected:
            d.errback(Failure(ConnectionDone("the client went away")))
        else:
            if self._finish_waiters is None:
                self._finish_waiters = []
            self._finish_waiters.append(d)
        return d

    def _finished_with(self, result: Failure | None) -> None:
        waiters, self._finish_waiters = self._finish_waiters or [], None
        for d in waiters:
            if result is None:
                d.callback(None)
            else:
                d.errback(result)


def _discard(data: bytes) -> None:
    pass


class ChannelState(StateEnum):
    """Where a L{ProxyChannel} is in its life (see docs/ARCHITECTURE.md)."""

    OPEN = "open"  # parsing requests and answering them in turn
    DRAINING = "draining"  # parsing nothing more; closes once the responses are out
    CLOSED = "closed"  # closing or closed: nothing more is parsed or begun


_OPEN, _DRAINING, _CLOSED = ChannelState
#: The legal moves. Draining a draining or closed channel, and closing a
#: closed one, do nothing and are not moves.
CHANNEL_TRANSITIONS: Transitions[ChannelState] = Transitions(
    "ProxyChannel",
    {
        _OPEN: [_DRAINING, _CLOSED],
        _DRAINING: [_CLOSED],
        _CLOSED: [],
    },
)


@implementer(IPushProducer)
class ProxyChannel(Protocol):
    """One client connection: parse requests with llhttp, relay one at a time.

    Its lifecycle is the one C{state} field (L{ChannelState}, moves checked
    by L{CHANNEL_TRANSITIONS}). Apart from it: the queue of requests (the
    head of line is answered, the others held), the parser's position as
    the kind of deadline armed, and read flow control (paused by us while
    held bodies exceed the hold limit), which may change in any state.
    """

    def __init__(self, factory: ProxyServerFactory) -> None:
        self.factory = factory
        self._parser = httptools.HttpRequestParser(self)
        self._requests: deque[ChannelRequest] = deque()
        self._current: ChannelRequest | None = None  # being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._held_bytes = 0
        self.state = _OPEN
        self._paused_by_us = False
        self._body_progress = 0
        self.deadline = float("inf")
        self._deadline_kind = "keepalive"

    # Twisted protocol

    def connectionMade(self) -> None:
        transport: Any = self.transport
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)
        transport.registerProducer(self, True)
        self._arm("keepalive", self.factory.keepalive_timeout)
        self.factory.deadlines.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state is not _OPEN:
            return
        coalescer = self.factory.coalescer
        coalescer.hold()
        try:
            self._received(data)
        finally:
            coalescer.release()

    def _received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error(400, "bad_request", "upgrades and CONNECT are not proxied")
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _TooLarge):
                self._protocol_error(431, "bad_request", "request head too large")
            elif isinstance(cause, _BadFraming):
                self._protocol_error(400, "bad_request", str(cause))
            else:
                self._protocol_error(400, "bad_request", f"malformed request: {e}")

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.deadlines.discard(self)
        if self.state is not _CLOSED:
            self.state = CHANNEL_TRANSITIONS.move(self.state, _CLOSED)
        requests, self._requests = self._requests, deque()
        for request in requests:
            request._disconnected = True
            request.channel = None
            if request._finish_waiters:
                request._finished_with(Failure(ConnectionDone("the client went away")))
            receiver = request.receiver
            if receiver is not None:
                try:
                    receiver.client_gone()
                except Exception:
                    _log.failure("client_gone raised")

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._arm("head", self.factory.head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url) + 16  # plus method, version, line ends
        if self._head_bytes > self.factory.max_head_bytes:
            raise _TooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every header of every request: kept to one call (the
        # head's size and the number of fields, both bounded).
        size = self._head_bytes + len(name) + len(value) + 4  # plus ": " and CRLF
        self._head_bytes = size
        headers = self._headers
        headers.append((name, value))
        factory = self.factory
        if size > factory.max_head_bytes or len(headers) > factory.max_headers:
            raise _TooLarge()

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = b"HTTP/" + parser.get_http_version().encode()
        headers = self._headers
        self._headers = []  # handed over to the request
        expects_continue, hosts = _check_framing(headers, version)
        request = ChannelRequest(self, parser.get_method(), self._url, version, headers, hosts)
        request.expects_continue = expects_continue
        request.keep_alive = parser.should_keep_alive()
        self._current = request
        self._requests.append(request)
        self._body_progress = 0
        self._arm("body", self.factory.body_timeout)
        if len(self._requests) == 1:
            self._begin(request)
        else:
            request.held = []

    def on_body(self, body: bytes) -> None:
        request = self._current
        if request is None:
            return
        # The body deadline moves only with real progress: a trickle of a
        # byte a second must not hold two connections open for days.
        self._body_progress += len(body)
        if self._body_progress >= _BODY_PROGRESS:
            self._body_progress = 0
            self._arm("body", self.factory.body_timeout)
        if request.held is not None:
            request.held.append(body)
            self._held_bytes += len(body)
            if self._held_bytes > self.factory.hold_limit:
                self._pause_reading()
            return
        self._deliver_chunk(request, body)

    def on_message_complete(self) -> None:
        request, self._current = self._current, None
        if request is None:
            return
        request.body_done = True
        if self._requests and request is self._requests[0]:
            self._deadline_kind = "none"  # _arm("none"), inline: once per request
            self.deadline = _NEVER
            self._deliver_end(request)
        if not request.keep_alive:
            # Anything after a Connection: close request is ignored.
            self.stop_reading_requests()

    # Request lifecycle

    def _begin(self, request: ChannelRequest) -> None:
        """Route the request (its body may still be arriving)."""
        if request.expects_continue and request.clientproto == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]  # connected
        resource = self.factory.resource
        try:
            receiver = resource.begin_streaming(request)
        except Exception:
            _log.failure("begin_streaming raised")
            receiver = None
            request.setResponseCode(500)
            request.finish()
            return
        if receiver is not None:
            request.receiver = receiver
            return
        # The proxy's own routes: the body is read whole (bounded), then rendered.
        request.content = io.BytesIO()

    def _deliver_chunk(self, request: ChannelRequest, data: bytes) -> None:
        receiver = request.receiver
        if receiver is not None:
            receiver.body_chunk(data)
        elif request.content is not None:
            if request.content.tell() + len(data) > _OWN_BODY_LIMIT:
                request.content = None
                self._answer(request, 413, "body_too_large", "body too large for this route")
                return
            request.content.write(data)

    def _deliver_end(self, request: ChannelRequest) -> None:
        receiver = request.receiver
        if receiver is not None:
            receiver.body_complete()
            return
        if request.content is None or request.finished:
            return
        request.content.seek(0)
        try:
            body = self.factory.resource.render(request)
        except Exception:
            _log.failure("render raised")
            self._answer(request, 500, "internal_error", "internal error")
            return
        if body is not server.NOT_DONE_YET and not request.finished:
            if isinstance(body, bytes):
                request.write(body)
            request.finish()

    def request_done(self, request: ChannelRequest) -> None:
        """The response to the head-of-line request is complete."""
        if not self._requests or self._requests[0] is not request:
            return
        self._requests.popleft()
        request.channel = None
        # The relay and the request point at each other: unlinked here, both
        # are freed at once by reference counting instead of piling up for
        # the cyclic garbage collector (a pause every few hundred requests).
        request.receiver = None
        request.producer = None
        if not request.keep_alive or self.state is not _OPEN:
            self._close()
            return
        if not request.body_done:
            # Responded before the body ended: the rest can't be parsed reliably.
            self._close()
            return
        if self._requests:
            self._start_held(self._requests[0])
        else:
            self._arm("keepalive", self.factory.keepalive_timeout)
            if self._paused_by_us:
                self._resume_reading()

    def _start_held(self, request: ChannelRequest) -> None:
        held, request.held = request.held or [], None
        self._held_bytes -= sum(len(c) for c in held)
        self._begin(request)
        for chunk in held:
            self._deliver_chunk(request, chunk)
        if request.body_done:
            self._deliver_end(request)
        if self._paused_by_us and self._held_bytes <= self.factory.hold_limit:
            self._resume_reading()

    def stop_reading_requests(self) -> None:
        """Parse nothing more on this connection; close once responses are out."""
        if self.state is _OPEN:
            self.state = CHANNEL_TRANSITIONS.move(_OPEN, _DRAINING)

    def _close(self) -> None:
        if self.state is _CLOSED:
            return
        self.state = CHANNEL_TRANSITIONS.move(self.state, _CLOSED)
        self.factory.deadlines.discard(self)
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    # Response writing

    def head_bytes(self, request: ChannelRequest) -> bytes:
        code = request.code
        reason = request.code_message or _REASONS.get(code, b"Unknown")
        headers = request.responseHeaders
        if (
            request.clientproto == b"HTTP/1.1"
            and request.method != b"HEAD"
            and code not in _NO_BODY
            and not headers.hasHeader(b"content-length")
        ):
            request.chunked = True
            headers.pairs.append((b"Transfer-Encoding", b"chunked"))
        if request.clientproto != b"HTTP/1.1" and not headers.hasHeader(b"content-length"):
            request.keep_alive = False  # HTTP/1.0 without a length: close frames the body
        if not request.keep_alive or self.state is not _OPEN:
            headers.setRawHeaders(b"Connection", [b"close"])
        parts = [b"HTTP/1.1 %d " % code, reason, b"\r\n"]
        for name, value in headers.pairs:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _answer(self, request: ChannelRequest, status: int, kind: str, message: str) -> None:
        request.write(prepare_error(request, status, kind, message))
        request.finish_and_close()

    def _protocol_error(self, status: int, kind: str, message: str) -> None:
        self.stop_reading_requests()
        broken = self._current
        if broken is not None and broken.receiver is not None and not broken.body_done:
            # The body of the request being relayed is malformed: the upstream
            # must not see a truncated body as complete.
            broken.receiver.client_gone()
        if self._requests:
            head = self._requests[0]
            if head is broken and not head.started_writing:
                self._requests.clear()
            else:
                # A response is under way: close once it is written.
                if head.started_writing and not head.body_done:
                    self._close()
                return
        body = error_body(kind, message)
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nX-LLMObserve-Error: %s\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), kind.encode(), len(body), body)
        )
        self._close()

    # Reading and writing backpressure

    def _pause_reading(self) -> None:
        if not self._paused_by_us:
            self._paused_by_us = True
            self.transport.pauseProducing()  # type: ignore[union-attr]  # connected: transport is set

    def _resume_reading(self) -> None:
        if self._paused_by_us:
            self._paused_by_us = False
            self.transport.resumeProducing()  # type: ignore[union-attr]  # connected: transport is set

    def pauseProducing(self) -> None:
        """The client's socket buffer is full: pause whoever produces the response."""
        if self._requests and self._requests[0].producer is not None:
            self._requests[0].producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._requests and self._requests[0].producer is not None:
            self._requests[0].producer.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # Deadlines (swept by the factory's DeadlineSweeper)

    def _arm(self, kind: str, seconds: float) -> None:
        self._deadline_kind = kind
        if kind == "none" or seconds <= 0:
            self.deadline = float("inf")
        else:
            self.deadline = self.factory.clock.seconds() + seconds

    def deadline_passed(self, now: float) -> None:
        kind = self._deadline_kind
        self.deadline = float("inf")
        if kind == "keepalive":
            self._close()
        elif self._requests and self._requests[0].started_writing:
            self._close()
        else:
            self._protocol_error(408, "client_timeout", f"request {kind} not received in time")
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()


class _TooLarge(Exception):
    pass


class _BadFraming(Exception):
    pass


def _check_framing(headers: list[tuple[bytes, bytes]], version: bytes) -> tuple[bool, list[bytes]]:
    """Refuse every ambiguous body framing (the smuggling vectors of RELIABILITY.md §2.1).

    Returns whether the (last) C{Expect} field asks for C{100-continue},
    and every C{Host} value (the one pass over the names that every
    request makes; the Host guard reads them).

    llhttp is strict, but a few forms it tolerates are refused here too:
    any Transfer-Encoding other than exactly C{chunked}, more than one
    Transfer-Encoding or Content-Length field (even equal ones), a
    Content-Length that is not all digits, both together, and
    Transfer-Encoding on HTTP/1.0.
    """
    te = cl = 0
    expects_continue = False
    hosts: list[bytes] = []
    kinds = REQUEST_KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = request_kind(name)  # each spelling lower-cased once
        if kind == HOST:
            hosts.append(value)
        elif kind == EXPECT:
            expects_continue = value.strip().lower() == b"100-continue"
        elif kind == TE:
            te += 1
            if value.strip().lower() != b"chunked":
                raise _BadFraming("only 'Transfer-Encoding: chunked' is accepted")
        elif kind == LENGTH:
            cl += 1
            if not value.strip().isdigit():
                raise _BadFraming("Content-Length must be digits")
    if te > 1 or cl > 1:
        raise _BadFraming("repeated framing header")
    if te and cl:
        raise _BadFraming("both Content-Length and Transfer-Encoding")
    if te and version != b"HTTP/1.1":
        raise _BadFraming("Transfer-Encoding needs HTTP/1.1")
    return expects_continue, hosts


class ProxyServerFactory(Factory):
    """Serves a L{ProxyResource} with L{ProxyChannel}s."""

    noisy = False

    def __init__(
        self,
        resource: Any,
        clock: Any,
        *,
        head_timeout: float = 20.0,
        body_timeout: float = 30.0,
        keepalive_timeout: float = 60.0,
        max_head_bytes: int = 64 * 1024,
        max_headers: int = 256,
        hold_limit: int = 64 * 1024,
        coalescer: WriteCoalescer | None = None,
    ) -> None:
        from llmobserve.proxy._relay import DeadlineSweeper

        self.resource = resource
        self.clock = clock
        self.coalescer = coalescer or WriteCoalescer()
        self.deadlines = DeadlineSweeper(clock, interval=0.5)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.hold_limit = hold_limit

    def buildProtocol(self, addr: Any) -> ProxyChannel:
        return ProxyChannel(self)
