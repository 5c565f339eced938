"""Fake upstream HTTP servers for real-process tests of the proxy.

Every server listens on an ephemeral loopback port and runs in its own
background threads (one accept thread, one thread per connection), never in
the test's reactor, so the same servers serve synchronous tests and
pytest-twisted tests alike.  Each records exactly what it received: the raw
bytes per connection, and the requests as parsed by h11 (the oracle: if h11
rejects what the proxy sent, the connection record says so in C{error}).

Times are C{time.monotonic()} values, which on Linux are comparable with the
same clock read in other processes and in the test.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol, Self
from urllib.parse import parse_qs, urlsplit

import h11

__all__ = [
    "BigBodyUpstream",
    "Close",
    "ConnectionRecord",
    "FullBacklogListener",
    "RawConnection",
    "RawScriptUpstream",
    "ReadHead",
    "ReadRequest",
    "RecordedRequest",
    "RecordingUpstream",
    "Reset",
    "Response",
    "SSEUpstream",
    "ScriptStep",
    "Send",
    "SendRepeated",
    "ShutdownWrite",
    "Sleep",
    "Stall",
    "UploadRecord",
    "WaitClosed",
    "anthropic_sse_events",
    "body_sha256",
    "closed_port",
    "generate_body",
    "json_response",
    "openai_sse_events",
]

LOOPBACK = ("127.0.0.1", "::1")

HeaderPairs = Sequence[tuple[bytes | str, bytes | str]]


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _check_loopback(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"fake upstreams bind loopback only, not {host!r}")


def closed_port(host: str = "127.0.0.1") -> int:
    """
    A port on C{host} that nothing listens on (bound, read, closed): connecting
    to it is refused, the "upstream down" case.
    """
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


# -- records ------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as the upstream parsed it (h11)."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    """Raw pairs in wire order, names in their original case."""
    body: bytes
    connection: int
    """Index of the connection it arrived on (0-based, in accept order)."""
    received_at: float
    """When the request head was complete."""
    first_body_at: float | None = None
    completed_at: float | None = None
    body_length: int = 0
    """Body bytes received (equals C{len(body)} unless the body was not kept)."""

    def header_values(self, name: bytes | str) -> list[bytes]:
        """Every value of header C{name} (case-insensitive), in order."""
        key = _b(name).lower()
        return [v for n, v in self.headers if n.lower() == key]

    def header(self, name: bytes | str) -> bytes | None:
        """The single value of C{name}; C{None} if absent; error if repeated."""
        values = self.header_values(name)
        if len(values) > 1:
            raise AssertionError(f"{name!r} repeated: {values!r}")
        return values[0] if values else None

    def header_names(self) -> list[bytes]:
        """Lower-cased header names in wire order."""
        return [n.lower() for n, _ in self.headers]

    @property
    def path(self) -> str:
        return urlsplit(self.target.decode("latin-1")).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target.decode("latin-1")).query, keep_blank_values=True)


@dataclass
class ConnectionRecord:
    """One accepted TCP connection."""

    index: int
    peer: tuple[str, int]
    opened_at: float
    raw: bytearray = field(default_factory=bytearray)
    """Every byte received on it."""
    requests: list[RecordedRequest] = field(default_factory=list)
    writes: list[tuple[float, int]] = field(default_factory=list)
    """(time, byte count) of every write the server made."""
    writes_blocked: int = 0
    """How many times a write found the socket buffer full (backpressure)."""
    first_blocked_at: float | None = None
    closed_at: float | None = None
    close_reason: str | None = None
    """C{client_eof}, C{client_reset}, C{server_close}, C{server_reset} or C{shutdown}."""
    error: str | None = None
    """h11's complaint about what the client sent, if any."""
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def closed_by_client(self) -> bool:
        return self.close_reason in ("client_eof", "client_reset")


# -- the server core --------------------------------------------------------------


class _Stopping(Exception):
    """The server is shutting down."""


class RawConnection:
    """
    The server side of one connection: non-blocking socket I/O that records
    everything and wakes up promptly when the server stops.  Scripts and
    handlers use this.
    """

    def __init__(
        self, sock: socket.socket, record: ConnectionRecord, server: _ThreadedServer
    ) -> None:
        self.sock = sock
        self.record = record
        self._server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.client_closed = False
        self.is_closed = False

    # low-level

    def _wait(self, *, read: bool, timeout: float | None) -> bool:
        wake = self._server._wake_r
        rlist: list[socket.socket] = [wake]
        wlist: list[socket.socket] = []
        (rlist if read else wlist).append(self.sock)
        r, w, _ = select.select(rlist, wlist, [], timeout)
        if wake in r:
            raise _Stopping
        return bool(r or w)

    def recv(self, timeout: float | None = None, size: int = 262144) -> bytes | None:
        """
        Bytes from the client; C{b""} when the client has closed; C{None}
        on timeout.
        """
        if self.client_closed:
            return b""
        if not self._wait(read=True, timeout=timeout):
            return None
        try:
            data = self.sock.recv(size)
        except BlockingIOError:
            return None
        except (ConnectionResetError, BrokenPipeError):
            self._mark_client_closed("client_reset")
            return b""
        if not data:
            self._mark_client_closed("client_eof")
            return b""
        self.record.raw += data
        return data

    def _mark_client_closed(self, reason: str) -> None:
        self.client_closed = True
        if self.record.close_reason is None:
            self.record.close_reason = reason
            self.record.closed_at = time.monotonic()

    def send(self, data: bytes) -> bool:
        """Write all of C{data}; C{False} if the client went away meanwhile."""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                if self.record.first_blocked_at is None:
                    self.record.first_blocked_at = time.monotonic()
                self.record.writes_blocked += 1
                self._wait(read=False, timeout=None)
                continue
            except (ConnectionResetError, BrokenPipeError):
                self._mark_client_closed("client_reset")
                return False
            view = view[n:]
        self.record.writes.append((time.monotonic(), len(data)))
        return True

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once (raising) if the server stops."""
        r, _, _ = select.select([self._server._wake_r], [], [], seconds)
        if r:
            raise _Stopping

    def poll_closed(self, timeout: float) -> bool:
        """
        Wait up to C{timeout} for the client to close; bytes that arrive
        meanwhile are recorded and queued for h11.  C{True} if it closed.
        """
        deadline = time.monotonic() + timeout
        while not self.client_closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            data = self.recv(left)
            if data is None:
                return False
            if data:
                self.h11.receive_data(data)
        return True

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            if self.record.close_reason is None:
                self.record.close_reason = "server_close"
                self.record.closed_at = time.monotonic()
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.sock.close()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0)."""
        if not self.is_closed:
            self.is_closed = True
            if self.record.close_reason is None:
                self.record.close_reason = "server_reset"
                self.record.closed_at = time.monotonic()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()

    def shutdown_write(self) -> None:
        """Half-close: send FIN, keep reading."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # HTTP

    def read_request(
        self,
        timeout: float | None = None,
        *,
        on_body: Callable[[bytes], None] | None = None,
        head_only: bool = False,
        request: RecordedRequest | None = None,
    ) -> RecordedRequest | None:
        """
        Read one request with h11.  Returns C{None} if the client closed (or
        the timeout passed) before a request head; records h11 errors on the
        connection record and returns C{None}.  With C{on_body} the body is
        handed over piece by piece instead of kept.  With C{head_only} return
        once the head is parsed (the body stays unread); pass that request
        back as C{request} to read the rest.
        """
        req: RecordedRequest | None = request
        if req is None and self.h11.their_state is h11.DONE:
            # A raw script wrote its own response to the previous request:
            # move h11 on to the next cycle.
            self._next_cycle()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self.record.error = f"h11: {e}"
                return None
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    # Tell h11 the 100 went out so it stops asking.
                    self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                data = self.recv(left)
                if data is None:
                    return None
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                req = RecordedRequest(
                    method=event.method,
                    target=event.target,
                    http_version=event.http_version,
                    headers=list(event.headers.raw_items()),
                    body=b"",
                    connection=self.record.index,
                    received_at=time.monotonic(),
                )
                self.record.requests.append(req)
                if head_only:
                    return req
            elif isinstance(event, h11.Data):
                assert req is not None
                if req.first_body_at is None:
                    req.first_body_at = time.monotonic()
                req.body_length += len(event.data)
                if on_body is None:
                    req.body += event.data
                else:
                    on_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                req.completed_at = time.monotonic()
                return req
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif event is h11.PAUSED:
                return None

    def _next_cycle(self) -> bool:
        try:
            if self.h11.our_state is h11.SEND_RESPONSE:
                self.h11.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            if self.h11.our_state is h11.SEND_BODY:
                self.h11.send(h11.EndOfMessage())
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
                return True
        except h11.LocalProtocolError:
            pass
        return False

    def finish_exchange(self, keep_alive: bool = True) -> bool:
        """
        Advance h11 past the response we wrote by hand.  Returns C{True} when
        the connection can carry another request, else closes it.
        """
        if keep_alive and not self.is_closed and self._next_cycle():
            return True
        self.close()
        return False

    def write_response(self, response: Response, *, head: bool = False) -> bool:
        """Send C{response}; C{False} if the client went away."""
        if response.delay:
            self.sleep(response.delay)
        for piece in response.serialize(head=head):
            if not self.send(piece):
                return False
            if response.chunk_interval:
                self.sleep(response.chunk_interval)
        return True


class _ThreadedServer:
    """A loopback TCP listener with a thread per connection."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 128, port: int = 0) -> None:
        _check_loopback(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(backlog)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[ConnectionRecord] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake_r, self._wake_w = socket.socketpair()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        self._stopped = False

    # life cycle

    def start(self) -> Self:
        t = threading.Thread(
            target=self._accept_loop, name=f"{type(self).__name__}:{self.port}", daemon=True
        )
        self._accept_thread = t
        t.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, wake and close every connection, join the threads."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        self._listener.close()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for s in list(self._socks):
                try:
                    s.close()
                except OSError:
                    pass
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        if self._accept_thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # what tests look at

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT} (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self.connections)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request on every connection, in arrival order."""
        with self._lock:
            reqs = [r for c in self.connections for r in c.requests]
        return sorted(reqs, key=lambda r: r.received_at)

    def raw_bytes(self) -> bytes:
        """Everything received on every connection, in accept order."""
        with self._lock:
            return b"".join(bytes(c.raw) for c in self.connections)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll C{predicate} (every 5 ms) until true or C{timeout}."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_requests(self, n: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until C{n} requests are complete; return them all."""
        self.wait_for(
            lambda: sum(1 for r in self.requests if r.completed_at is not None) >= n, timeout
        )
        return self.requests

    def wait_connections(self, n: int = 1, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self.connection_count >= n, timeout)

    # internals

    def _accept_loop(self) -> None:
        while True:
            r, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in r:
                return
            try:
                sock, peer = self._listener.accept()
            except OSError:
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                record = ConnectionRecord(
                    index=len(self.connections), peer=peer[:2], opened_at=time.monotonic()
                )
                self.connections.append(record)
                self._socks.add(sock)
                self._changed.notify_all()
            t = threading.Thread(
                target=self._serve_connection,
                args=(sock, record),
                name=f"{type(self).__name__}:{self.port}#{record.index}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()

    def _serve_connection(self, sock: socket.socket, record: ConnectionRecord) -> None:
        conn = RawConnection(sock, record, self)
        try:
            self.handle(conn)
        except _Stopping:
            if record.close_reason is None:
                record.close_reason = "shutdown"
                record.closed_at = time.monotonic()
        except OSError as e:
            if record.close_reason is None:
                record.close_reason = "client_reset"
                record.closed_at = time.monotonic()
            record.error = record.error or f"{type(e).__name__}: {e}"
        except Exception as e:
            record.error = f"handler crashed: {type(e).__name__}: {e}"
            raise
        finally:
            conn.close()
            with self._lock:
                self._socks.discard(sock)
            record.closed.set()

    def handle(self, conn: RawConnection) -> None:
        raise NotImplementedError


# -- scripted responses ----------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """
    A scripted response.  Headers are written verbatim, in order.

    C{framing}: C{auto} adds C{Content-Length} (or chunked framing when
    C{body} is a sequence of chunks) unless the headers already carry
    C{Content-Length} / C{Transfer-Encoding}, in which case the body is
    written as given; C{chunked} and C{content-length} force the framing;
    C{close} writes no framing header (the body ends when the connection
    closes, and it is closed after); C{none} writes headers and body verbatim.
    """

    status: int = 200
    headers: HeaderPairs = ()
    body: bytes | Sequence[bytes] = b""
    reason: bytes | None = None
    framing: Literal["auto", "chunked", "content-length", "close", "none"] = "auto"
    delay: float = 0.0
    """Seconds to wait before writing the status line."""
    chunk_interval: float = 0.0
    """Seconds to wait after each written piece (status+headers, each chunk)."""

    @property
    def closes(self) -> bool:
        if self.framing == "close":
            return True
        return any(
            _b(n).lower() == b"connection" and b"close" in _b(v).lower() for n, v in self.headers
        )

    def serialize(self, *, head: bool = False) -> list[bytes]:
        reason = self.reason if self.reason is not None else _REASONS.get(self.status, b"Unknown")
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, reason)]
        names = {_b(n).lower() for n, _ in self.headers}
        chunks = [self.body] if isinstance(self.body, bytes) else list(self.body)
        framing = self.framing
        if framing == "auto":
            if b"content-length" in names or b"transfer-encoding" in names:
                framing = "none"
            elif isinstance(self.body, bytes):
                framing = "content-length"
            else:
                framing = "chunked"
        no_body = head or self.status in (204, 304) or 100 <= self.status < 200
        if framing == "content-length":
            lines.append(b"Content-Length: %d\r\n" % sum(len(c) for c in chunks))
        elif framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
        for n, v in self.headers:
            lines.append(_b(n) + b": " + _b(v) + b"\r\n")
        lines.append(b"\r\n")
        out = [b"".join(lines)]
        if no_body and framing != "none":
            return out
        if framing == "chunked":
            out += [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c]
            out.append(b"0\r\n\r\n")
        else:
            out += [c for c in chunks if c]
        return out


def json_response(obj: object, status: int = 200, headers: HeaderPairs = ()) -> Response:
    """A C{Response} with a JSON body and C{Content-Type: application/json}."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Response(status, [("Content-Type", "application/json"), *headers], body)


_REASONS: dict[int, bytes] = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    529: b"Overloaded",
}

DEFAULT_RESPONSE = json_response(
    {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
)

Responder = Response | Callable[[RecordedRequest], Response]


class RecordingUpstream(_ThreadedServer):
    """
    Answers every request with a scripted response and records it.

    Responses come from the queue given to L{queue} first (one per request),
    then from the default set with L{respond_with}: a L{Response} or a
    callable C{(RecordedRequest) -> Response}.  Default: an OpenAI-like chat
    completion JSON.  Keep-alive is honoured unless the response says close.
    """

    def __init__(
        self,
        response: Responder = DEFAULT_RESPONSE,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(host, port=port)
        self._default: Responder = response
        self._queue: deque[Responder] = deque()
        self.idle_timeout = idle_timeout

    def respond_with(self, response: Responder) -> None:
        self._default = response

    def queue(self, *responses: Responder) -> None:
        with self._lock:
            self._queue.extend(responses)

    def _next(self, request: RecordedRequest) -> Response:
        with self._lock:
            responder = self._queue.popleft() if self._queue else self._default
        return responder(request) if callable(responder) else responder

    def handle(self, conn: RawConnection) -> None:
        while True:
            request = conn.read_request(self.idle_timeout)
            if request is None:
                return
            response = self._next(request)
            if not conn.write_response(response, head=request.method == b"HEAD"):
                return
            if not conn.finish_exchange(not response.closes):
                return


# -- SSE ----------------------------------------------------------------------


def _sse(data: object, event: str | None = None) -> bytes:
    payload = json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


def openai_sse_events(
    n: int = 5,
    *,
    model: str = "gpt-4o-mini-2024-07-18",
    prompt_tokens: int = 11,
    padding: int = 0,
    include_usage: bool = True,
) -> list[bytes]:
    """
    An OpenAI chat-completion stream: C{n} content deltas, the finishing
    chunk, the usage chunk (C{stream_options.include_usage}), C{[DONE]}.
    Each list item is one complete SSE event.  C{padding} extra characters
    of content per delta make events bigger.
    """
    base = {"id": "chatcmpl-sse", "object": "chat.completion.chunk", "created": 1700000000}
    events = [
        _sse(
            {
                **base,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
    ]
    pad = "x" * padding
    for i in range(n):
        events.append(
            _sse(
                {
                    **base,
                    "model": model,
                    "choices": [
                        {"index": 0, "delta": {"content": f"tok{i} {pad}"}, "finish_reason": None}
                    ],
                }
            )
        )
    events.append(
        _sse(
            {
                **base,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )
    )
    if include_usage:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        events.append(_sse({**base, "model": model, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_sse_events(
    n: int = 5,
    *,
    model: str = "claude-3-5-sonnet-20241022",
    input_tokens: int = 25,
    padding: int = 0,
) -> list[bytes]:
    """An Anthropic Messages stream with C{n} text deltas; usage in start and delta."""
    pad = "x" * padding
    events = [
        _sse(
            {
                "type": "message_start",
                "message": {
                    "id": "msg_sse",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
            "message_start",
        ),
        _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    for i in range(n):
        events.append(
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"tok{i} {pad}"},
                },
                "content_block_delta",
            )
        )
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": n},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


@dataclass
class StreamRecord:
    """One SSE response the upstream streamed."""

    connection: int
    request: RecordedRequest
    events_total: int
    started_at: float
    event_times: list[float] = field(default_factory=list)
    """When each event was written (len = events actually written)."""
    completed_at: float | None = None
    client_closed_at: float | None = None


class SSEUpstream(_ThreadedServer):
    """
    Streams an OpenAI-shaped (or, for paths ending in C{/messages} or with
    C{flavor="anthropic"}, Anthropic-shaped) SSE response to every request:
    C{events} content deltas written C{interval} seconds apart, then the
    usage and terminator events.  Each event is written (and recorded) as its
    own chunk.  While waiting between events it watches for the client
    closing: C{client_closed} is set, and the stream stops, when a client
    leaves before the end.
    """

    def __init__(
        self,
        events: int = 5,
        interval: float = 0.05,
        *,
        flavor: Literal["auto", "openai", "anthropic"] = "auto",
        padding: int = 0,
        first_delay: float = 0.0,
        framing: Literal["chunked", "close"] = "chunked",
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.events = events
        self.interval = interval
        self.flavor = flavor
        self.padding = padding
        self.first_delay = first_delay
        self.framing = framing
        self.streams: list[StreamRecord] = []
        self.client_closed = threading.Event()
        self.completed = threading.Event()
        # Made once, before any request: 50,000 padded events take a loaded
        # machine seconds to build, and a head held back that long met the
        # proxy's header deadline (a 504 that was the fake's, not the proxy's).
        self._made: dict[str, list[bytes]] = {}
        if flavor != "anthropic":
            self._made["openai"] = openai_sse_events(events, padding=padding)

    def events_for(self, request: RecordedRequest | None) -> list[bytes]:
        """The exact events this upstream sends for C{request}."""
        flavor = self.flavor
        if flavor == "auto":
            flavor = (
                "anthropic"
                if request is not None and request.path.endswith("/messages")
                else "openai"
            )
        made = self._made.get(flavor)
        if made is None:
            made = self._made[flavor] = (
                anthropic_sse_events(self.events, padding=self.padding)
                if flavor == "anthropic"
                else openai_sse_events(self.events, padding=self.padding)
            )
        return made

    def body_for(self, request: RecordedRequest | None = None) -> bytes:
        """The whole (de-chunked) body this upstream sends."""
        return b"".join(self.events_for(request))

    def handle(self, conn: RawConnection) -> None:
        while True:
            request = conn.read_request()
            if request is None:
                return
            events = self.events_for(request)
            record = StreamRecord(conn.record.index, request, len(events), time.monotonic())
            with self._lock:
                self.streams.append(record)
            if not self._stream(conn, record, events):
                record.client_closed_at = conn.record.closed_at or time.monotonic()
                self.client_closed.set()
                return
            record.completed_at = time.monotonic()
            self.completed.set()
            if not conn.finish_exchange(self.framing == "chunked"):
                return

    def _stream(self, conn: RawConnection, record: StreamRecord, events: list[bytes]) -> bool:
        head = [
            b"HTTP/1.1 200 OK\r\n",
            b"Content-Type: text/event-stream\r\n",
            b"Cache-Control: no-cache\r\n",
        ]
        if self.framing == "chunked":
            head.append(b"Transfer-Encoding: chunked\r\n")
        else:
            head.append(b"Connection: close\r\n")
        if self.first_delay and conn.poll_closed(self.first_delay):
            return False
        if not conn.send(b"".join(head) + b"\r\n"):
            return False
        for i, event in enumerate(events):
            if i and self.interval and conn.poll_closed(self.interval):
                return False
            if conn.client_closed:
                return False
            piece = b"%x\r\n%s\r\n" % (len(event), event) if self.framing == "chunked" else event
            if not conn.send(piece):
                return False
            record.event_times.append(time.monotonic())
        if self.framing == "chunked":
            return conn.send(b"0\r\n\r\n")
        return True


# -- big bodies ------------------------------------------------------------------

_BLOCK = bytes(range(256)) * 1024  # 256 KiB; position-dependent content
MiB = 1 << 20


def generate_body(size: int, chunk: int = len(_BLOCK)) -> Iterator[bytes]:
    """C{size} bytes of a fixed pattern, in pieces of at most C{chunk} bytes."""
    chunk = min(chunk, len(_BLOCK))
    block = _BLOCK[:chunk]
    full, rest = divmod(size, chunk)
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def body_sha256(size: int) -> str:
    """SHA-256 hex of C{generate_body(size)}."""
    h = hashlib.sha256()
    for piece in generate_body(size):
        h.update(piece)
    return h.hexdigest()


@dataclass
class UploadRecord:
    connection: int
    request: RecordedRequest
    started_at: float
    bytes: int = 0
    sha256: str = ""
    first_body_at: float | None = None
    completed_at: float | None = None


class BigBodyUpstream(_ThreadedServer):
    """
    GET/HEAD: serves C{generate_body(size)} without holding it, with
    C{Content-Length} or, with C{?framing=chunked}, chunked; C{?size=N}
    overrides the default size.

    POST/PUT/PATCH: reads the body without keeping it, counting bytes and
    hashing them, and answers JSON C{{"bytes": N, "sha256": HEX}}.  Progress
    is visible while the upload runs (C{uploads[-1].bytes}).
    """

    def __init__(self, size: int = 100 * MiB, *, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.size = size
        self.uploads: list[UploadRecord] = []
        self.downloads_sent: list[int] = []

    def handle(self, conn: RawConnection) -> None:
        while True:
            request = conn.read_request(head_only=True)
            if request is None:
                return
            if request.method in (b"GET", b"HEAD"):
                if not self._drain_body(conn, request):
                    return
                ok = self._download(conn, request)
            else:
                ok = self._upload(conn, request)
            if not ok or not conn.finish_exchange():
                return

    def _drain_body(self, conn: RawConnection, request: RecordedRequest) -> bool:
        return conn.read_request(on_body=lambda _: None, request=request) is not None

    def _download(self, conn: RawConnection, request: RecordedRequest) -> bool:
        q = request.query
        size = int(q.get("size", [str(self.size)])[0])
        chunked = q.get("framing", ["length"])[0] == "chunked"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        head += b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % size
        if not conn.send(head + b"\r\n"):
            return False
        if request.method == b"HEAD":
            return True
        index = len(self.downloads_sent)
        self.downloads_sent.append(0)
        for piece in generate_body(size):
            ok = conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if not ok:
                return False
            self.downloads_sent[index] += len(piece)
        return conn.send(b"0\r\n\r\n") if chunked else True

    def _upload(self, conn: RawConnection, request: RecordedRequest) -> bool:
        record = UploadRecord(conn.record.index, request, time.monotonic())
        self.uploads.append(record)
        digest = hashlib.sha256()

        def on_body(data: bytes) -> None:
            if record.first_body_at is None:
                record.first_body_at = time.monotonic()
            record.bytes += len(data)
            digest.update(data)

        if conn.read_request(on_body=on_body, request=request) is None:
            return False
        record.completed_at = time.monotonic()
        record.sha256 = digest.hexdigest()
        resp = json_response({"bytes": record.bytes, "sha256": record.sha256})
        return conn.write_response(resp)


# -- raw scripts ------------------------------------------------------------------


@dataclass(frozen=True)
class ReadRequest:
    """Read one whole request (head and body) with h11."""

    timeout: float | None = 10.0

    def run(self, conn: RawConnection) -> None:
        conn.read_request(self.timeout)


@dataclass(frozen=True)
class ReadHead:
    """Read a request head only (the body stays unread)."""

    timeout: float | None = 10.0

    def run(self, conn: RawConnection) -> None:
        conn.read_request(self.timeout, head_only=True)


@dataclass(frozen=True)
class Send:
    data: bytes

    def run(self, conn: RawConnection) -> None:
        conn.send(self.data)


@dataclass(frozen=True)
class SendRepeated:
    """
    Send C{data} C{count} times (C{None}: until the client closes or
    C{max_seconds} pass), C{interval} seconds apart.
    """

    data: bytes
    count: int | None = None
    interval: float = 0.0
    max_seconds: float = 30.0

    def run(self, conn: RawConnection) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while (self.count is None or sent < self.count) and time.monotonic() < deadline:
            if not conn.send(self.data):
                return
            sent += 1
            if self.interval and conn.poll_closed(self.interval):
                return
            if not self.interval and sent % 64 == 0 and conn.poll_closed(0):
                return


@dataclass(frozen=True)
class Sleep:
    seconds: float

    def run(self, conn: RawConnection) -> None:
        conn.sleep(self.seconds)


@dataclass(frozen=True)
class WaitClosed:
    """Wait (reading and recording) until the client closes, or C{timeout}."""

    timeout: float = 30.0

    def run(self, conn: RawConnection) -> None:
        conn.poll_closed(self.timeout)


Stall = WaitClosed
"""Send nothing more; wait for the client to give up (alias of L{WaitClosed})."""


@dataclass(frozen=True)
class Close:
    """Close cleanly (FIN)."""

    def run(self, conn: RawConnection) -> None:
        conn.close()


@dataclass(frozen=True)
class Reset:
    """Abort with RST (SO_LINGER 0)."""

    def run(self, conn: RawConnection) -> None:
        conn.reset()


@dataclass(frozen=True)
class ShutdownWrite:
    """Half-close: FIN our side, keep reading."""

    def run(self, conn: RawConnection) -> None:
        conn.shutdown_write()


class ScriptStep(Protocol):
    """Anything with C{run(conn)}: the step classes above, or your own."""

    def run(self, conn: RawConnection) -> None: ...


Script = Sequence[ScriptStep] | Callable[[RawConnection], None]


class RawScriptUpstream(_ThreadedServer):
    """
    Runs a script of raw steps on each connection, for hostile-upstream tests.

    C{script} is a sequence of steps (L{ReadRequest}, L{Send}, L{Sleep},
    L{Close}, L{Reset}, ...) or a callable taking the L{RawConnection}.
    C{scripts} (optional) gives one script per connection in accept order;
    connections past its end use C{script}.  When a script ends with the
    connection still open, the upstream waits for the client to close it (up
    to C{linger} seconds) and then closes.
    """

    def __init__(
        self,
        script: Script = (),
        *,
        scripts: Sequence[Script] = (),
        linger: float = 30.0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.script = script
        self.scripts = list(scripts)
        self.linger = linger

    def handle(self, conn: RawConnection) -> None:
        index = conn.record.index
        script = self.scripts[index] if index < len(self.scripts) else self.script
        if callable(script):
            script(conn)
        else:
            for step in script:
                if conn.is_closed:
                    break
                step.run(conn)
        if not conn.is_closed:
            conn.poll_closed(self.linger)


class FullBacklogListener:
    """
    A loopback port whose accept backlog is full, so new connections hang in
    SYN-sent (the "connect never completes" case for connect timeouts).
    """

    def __init__(self, host: str = "127.0.0.1", fillers: int = 8) -> None:
        _check_loopback(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(0)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(fillers):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((host, self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)
        time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
