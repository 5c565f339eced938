"""Small HTTP/1.1 clients for tests that need exact bytes or exact timing.

L{RawClient} sends the bytes you give it and parses the reply with h11 (so a
malformed reply from the proxy fails loudly).  L{StreamReader} records the
arrival time (C{time.monotonic()}) of every piece of a streamed response body
and can abort the connection at any point (FIN or RST).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import h11

__all__ = [
    "TARGET_HEADER",
    "RawClient",
    "RawResponse",
    "StreamReader",
    "build_request",
    "proxy_request",
    "raw_request",
]

TARGET_HEADER = "X-LLMObserve-Target-URL"

HeaderPairs = Sequence[tuple[bytes | str, bytes | str]]


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def build_request(
    method: bytes | str,
    target: bytes | str,
    headers: HeaderPairs = (),
    body: bytes | Iterable[bytes] | None = None,
    *,
    host: bytes | str | None = None,
    chunked: bool = False,
) -> bytes:
    """
    Serialise a request exactly: headers verbatim and in order.  Adds C{Host}
    when C{host} is given, and C{Content-Length} (or, with C{chunked},
    chunked framing) when there is a body and the headers carry neither.
    """
    lines = [_b(method) + b" " + _b(target) + b" HTTP/1.1\r\n"]
    if host is not None:
        lines.append(b"Host: " + _b(host) + b"\r\n")
    names = {_b(n).lower() for n, _ in headers}
    for n, v in headers:
        lines.append(_b(n) + b": " + _b(v) + b"\r\n")
    payload = b""
    if body is not None:
        pieces = [body] if isinstance(body, bytes) else list(body)
        if chunked:
            if b"transfer-encoding" not in names:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
        else:
            payload = b"".join(pieces)
            if b"content-length" not in names and b"transfer-encoding" not in names:
                lines.append(b"Content-Length: %d\r\n" % len(payload))
    lines.append(b"\r\n")
    return b"".join(lines) + payload


def proxy_request(
    proxy_port: int,
    method: bytes | str,
    target_url: str,
    headers: HeaderPairs = (),
    body: bytes | Iterable[bytes] | None = None,
    *,
    path: str = "/proxy",
    chunked: bool = False,
) -> bytes:
    """
    The bytes of a C{/proxy} request to the proxy on 127.0.0.1:C{proxy_port}
    (C{Host} is the proxy's own authority) forwarding to C{target_url}.
    """
    return build_request(
        method,
        path,
        [(TARGET_HEADER, target_url), *headers],
        body,
        host=f"127.0.0.1:{proxy_port}",
        chunked=chunked,
    )


@dataclass
class RawResponse:
    """A response as parsed by h11."""

    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    """Raw pairs in wire order, original case."""
    body: bytes
    raw: bytes
    """Every byte read for this response."""
    complete: bool
    """The body ended properly (its framing said so), not by close or timeout."""
    informational: list[int] = field(default_factory=list)
    """Status codes of any 1xx responses before this one."""
    head_at: float = 0.0
    chunk_times: list[tuple[float, int]] = field(default_factory=list)

    def header_values(self, name: bytes | str) -> list[bytes]:
        key = _b(name).lower()
        return [v for n, v in self.headers if n.lower() == key]

    def header(self, name: bytes | str) -> bytes | None:
        values = self.header_values(name)
        if len(values) > 1:
            raise AssertionError(f"{name!r} repeated: {values!r}")
        return values[0] if values else None

    def header_names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """
    One TCP connection to C{(host, port)}, byte-exact.  Several requests may
    be sent on it in turn (keep-alive tests).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
    ) -> None:
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("loopback only")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        self._pending = b""
        self.server_closed = False

    def send(self, data: bytes) -> None:
        """Send raw bytes (not seen by the h11 state machine)."""
        self.sock.sendall(data)

    def request(
        self,
        method: bytes | str,
        target: bytes | str,
        headers: HeaderPairs = (),
        body: bytes | None = None,
        *,
        host: bytes | str | None = None,
        chunked: bool = False,
        timeout: float | None = None,
    ) -> RawResponse:
        """Build, send, read one response (see L{build_request})."""
        host = host if host is not None else "{}:{}".format(*self.sock.getpeername()[:2])
        data = build_request(method, target, headers, body, host=host, chunked=chunked)
        self.send(data)
        return self.read_response(method=method, timeout=timeout)

    def _recv(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete response in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.server_closed = True
        return data

    def read_response(
        self,
        *,
        method: bytes | str = b"GET",
        timeout: float | None = None,
        on_data: Any = None,
    ) -> RawResponse:
        """
        Read one response.  h11 is told the request method (for HEAD) by a
        synthetic request event, since the bytes were sent raw.  If the
        connection closes or times out before the body's end, returns what
        arrived with C{complete=False}; raises C{TimeoutError} if not even
        the head arrived.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=_b(method), target=b"/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        raw = bytearray()
        informational: list[int] = []
        response: h11.Response | None = None
        body = bytearray()
        chunk_times: list[tuple[float, int]] = []
        head_at = 0.0
        if self._pending:
            conn.receive_data(self._pending)
            raw += self._pending
            self._pending = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if response is None:
                    raise
                break  # e.g. closed inside a chunked body: an unclean end
            if event is h11.NEED_DATA:
                try:
                    data = self._recv(deadline)
                except TimeoutError:
                    if response is None:
                        raise
                    break
                now = time.monotonic()
                raw += data
                conn.receive_data(data)
                if data and response is not None:
                    chunk_times.append((now, len(data)))
                continue
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                response = event
                head_at = time.monotonic()
            elif isinstance(event, h11.Data):
                body += event.data
                if on_data is not None:
                    on_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return RawResponse(
                    response.status_code,
                    response.reason,
                    response.http_version,
                    list(response.headers.raw_items()),
                    bytes(body),
                    bytes(raw),
                    True,
                    informational,
                    head_at,
                    chunk_times,
                )
            elif isinstance(event, h11.ConnectionClosed):
                if response is None:
                    raise ConnectionError(f"closed before a response; got {bytes(raw)!r}")
                break
        assert response is not None
        return RawResponse(
            response.status_code,
            response.reason,
            response.http_version,
            list(response.headers.raw_items()),
            bytes(body),
            bytes(raw),
            False,
            informational,
            head_at,
            chunk_times,
        )

    def peek(self, timeout: float = 1.0) -> bytes:
        """
        Wait up to C{timeout} for some bytes and return them, keeping them
        for the next L{read_response} (e.g. to see a C{100 Continue} arrive
        before the body is sent).  C{b""} if nothing came.
        """
        deadline = time.monotonic() + timeout
        try:
            data = self._recv(deadline)
        except TimeoutError:
            return b""
        self._pending += data
        return data

    def read_raw(self, timeout: float = 2.0, until_close: bool = True) -> bytes:
        """Read raw bytes until the server closes (or C{timeout})."""
        deadline = time.monotonic() + timeout
        out = bytearray()
        while True:
            try:
                data = self._recv(deadline)
            except TimeoutError:
                break
            if not data:
                break
            out += data
            if not until_close:
                break
        return bytes(out)

    def wait_closed(self, timeout: float = 2.0) -> bool:
        """C{True} if the server closed the connection within C{timeout}."""
        deadline = time.monotonic() + timeout
        while not self.server_closed:
            try:
                data = self._recv(deadline)
            except TimeoutError:
                return False
            self._pending += data
        return True

    def close(self) -> None:
        """Close cleanly (FIN)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def reset(self) -> None:
        """Abort with RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()


def raw_request(
    port: int,
    data: bytes,
    *,
    host: str = "127.0.0.1",
    method: bytes | str = b"GET",
    timeout: float = 10.0,
) -> RawResponse:
    """Open a connection, send C{data} exactly, read one response, close."""
    with RawClient(port, host, timeout=timeout) as client:
        client.send(data)
        return client.read_response(method=method)


class StreamReader:
    """
    Send one request and read the streamed response piece by piece,
    recording when each piece arrived.

        with StreamReader(proxy.port, request_bytes) as s:
            s.read_head()
            s.read_until(lambda body: body.count(b"\\n\\n") >= 3)
            s.abort()
    """

    def __init__(
        self,
        port: int,
        request: bytes,
        host: str = "127.0.0.1",
        *,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        keep_body: bool = True,
        on_data: Callable[[bytes], None] | None = None,
    ) -> None:
        """
        @param keep_body: keep the body and per-piece records (set C{False}
            for huge bodies: only C{received} counts, and C{on_data} sees each
            piece).
        """
        self.keep_body = keep_body
        self.on_data = on_data
        self.received = 0
        self.first_data_at: float | None = None
        self.client = RawClient(port, host, timeout=timeout, rcvbuf=rcvbuf)
        self.timeout = timeout
        self.sent_at = time.monotonic()
        self.client.send(request)
        self.conn = self.client.h11
        self.conn.send(h11.Request(method=b"GET", target=b"/", headers=[("Host", "x")]))
        self.conn.send(h11.EndOfMessage())
        self.response: h11.Response | None = None
        self.head_at: float | None = None
        self.body = bytearray()
        self.chunks: list[tuple[float, bytes]] = []
        """(arrival time, decoded body bytes) per piece, in order."""
        self.complete = False
        """The body ended by its framing (a clean end)."""
        self.closed = False
        """The connection closed (cleanly or not)."""

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        assert self.response is not None
        return list(self.response.headers.raw_items())

    def _step(self, deadline: float) -> bool:
        """Process one h11 event (reading if needed); C{False} at the end."""
        if self.complete or self.closed:
            return False
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self.closed = True
            return False
        if event is h11.NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("stream read timed out")
            self.client.sock.settimeout(left)
            try:
                data = self.client.sock.recv(262144)
            except TimeoutError as e:
                raise TimeoutError("stream read timed out") from e
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)
            if not data:
                self.closed = True
            return True
        if isinstance(event, h11.Response):
            self.response = event
            self.head_at = time.monotonic()
        elif isinstance(event, h11.Data):
            if self.first_data_at is None:
                self.first_data_at = time.monotonic()
            self.received += len(event.data)
            if self.on_data is not None:
                self.on_data(bytes(event.data))
            if self.keep_body:
                self.body += event.data
                self.chunks.append((time.monotonic(), bytes(event.data)))
        elif isinstance(event, h11.EndOfMessage):
            self.complete = True
            return False
        elif isinstance(event, h11.ConnectionClosed):
            self.closed = True
            return False
        return True

    def read_head(self, timeout: float | None = None) -> int:
        """Wait for the response head; return the status."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.response is None:
            if not self._step(deadline):
                raise ConnectionError("stream ended before the response head")
        return self.response.status_code

    def read_until(self, predicate: Any, timeout: float | None = None) -> bool:
        """
        Read until C{predicate(bytes(body))} is true (returns C{True}) or the
        stream ends (returns C{False}).
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        while not predicate(bytes(self.body)):
            if not self._step(deadline):
                return bool(predicate(bytes(self.body)))
        return True

    def read_all(self, timeout: float | None = None) -> bytes:
        """Read to the end of the stream; return the body."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._step(deadline):
            pass
        return bytes(self.body)

    def sse_events(self) -> list[bytes]:
        """The complete SSE events received so far."""
        text = bytes(self.body).replace(b"\r\n", b"\n")
        parts = text.split(b"\n\n")
        return [p + b"\n\n" for p in parts[:-1]]

    def abort(self, *, rst: bool = False) -> float:
        """Close the connection (FIN, or RST); return when (just before closing)."""
        when = time.monotonic()
        if rst:
            self.client.reset()
        else:
            self.client.close()
        return when

    def close(self) -> None:
        self.client.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def chat_request(
    port: int, upstream_url: str, body: bytes = b'{"model":"gpt-4o-mini","messages":[]}'
) -> bytes:
    """The bytes of a chat-completion C{POST} to C{upstream_url} through the
    proxy on C{port} (C{/proxy} with the target header)."""
    return proxy_request(
        port,
        "POST",
        upstream_url + "/v1/chat/completions",
        [("Content-Type", "application/json")],
        body,
    )


def chat_calls(port: int, upstream_url: str, calls: int) -> None:
    """Make C{calls} small chat-completion calls to C{upstream_url} through
    the proxy on C{port}, one at a time; each must answer 200."""
    for _ in range(calls):
        response = raw_request(port, chat_request(port, upstream_url))
        assert response.status == 200
