"""Helpers for hostile-input tests of the real proxy process (RELIABILITY T06-T19).

- L{exchange}: send exact bytes (optionally in segments), read every byte
  the proxy answers until it closes or goes quiet, and parse the answer
  with h11 (the oracle: a reply h11 rejects is a malformed reply).
- L{parse_upstream}: parse what an upstream received with h11.
- L{TLSUpstream}: a threaded C{ssl}-wrapped HTTP/1.1 server on 127.0.0.1
  that records every handshake and every application byte.
- L{store_events}, L{grep_tree}: look at what a stopped proxy left on disk.

Everything here connects to and listens on loopback only.
"""

from __future__ import annotations

import datetime
import select
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import h11

__all__ = [
    "Exchange",
    "ParsedResponse",
    "TLSUpstream",
    "UpstreamParse",
    "exchange",
    "grep_tree",
    "parse_responses",
    "parse_upstream",
    "self_signed_pem",
    "store_events",
]

_LOOPBACK = ("127.0.0.1", "::1")


# -- client side ------------------------------------------------------------------


@dataclass
class ParsedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool

    def header(self, name: bytes | str) -> bytes | None:
        key = (name.encode() if isinstance(name, str) else name).lower()
        values = [v for n, v in self.headers if n.lower() == key]
        return values[-1] if values else None


@dataclass
class Exchange:
    """What the proxy answered to one connection's bytes."""

    raw: bytes
    closed: bool
    """The proxy closed the connection (EOF or RST) before we stopped reading."""
    responses: list[ParsedResponse]
    malformed: str | None
    """h11's complaint about the reply bytes, if any."""
    elapsed: float

    @property
    def first(self) -> ParsedResponse | None:
        return self.responses[0] if self.responses else None

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def parse_responses(
    raw: bytes, methods: Sequence[bytes] = ()
) -> tuple[list[ParsedResponse], str | None]:
    """
    Parse consecutive HTTP/1.1 responses from C{raw}.  C{methods[i]} is the
    method of the request that response C{i} answers (C{GET} by default; it
    matters for HEAD).  Returns the responses (the last may be incomplete)
    and h11's complaint, if any.
    """
    out: list[ParsedResponse] = []
    data = raw
    index = 0
    while data:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        method = methods[index] if index < len(methods) else b"GET"
        conn.send(h11.Request(method=method, target=b"/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        conn.receive_data(b"")  # we hold every byte there will be
        current: ParsedResponse | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    current = ParsedResponse(
                        event.status_code, list(event.headers.raw_items()), b"", False
                    )
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    current.body = bytes(body)
                    current.complete = True
                    out.append(current)
                    break
                elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    if current is not None:
                        current.body = bytes(body)
                        out.append(current)
                    return out, None
                elif event is h11.PAUSED:
                    break
        except h11.RemoteProtocolError as e:
            if current is not None:
                current.body = bytes(body)
                # A body cut by the close is an unclean end, not a malformed head.
                out.append(current)
                return out, None
            return out, f"h11: {e} in {data[:200]!r}"
        data = conn.trailing_data[0]
        index += 1
        if current is not None and current.header("connection") == b"close":
            if data:
                return out, f"bytes after a Connection: close response: {data[:100]!r}"
            break
    return out, None


def exchange(
    port: int,
    data: bytes | Sequence[bytes],
    *,
    methods: Sequence[bytes] = (),
    timeout: float = 3.0,
    quiet: float = 0.3,
    segment_gap: float = 0.0,
    host: str = "127.0.0.1",
) -> Exchange:
    """
    Connect, send C{data} (one piece, or segments C{segment_gap} seconds
    apart), then read until the proxy closes, or until it has been quiet for
    C{quiet} seconds, or C{timeout} passes.  Never half-closes: the proxy
    decides.
    """
    if host not in _LOOPBACK:
        raise ValueError("loopback only")
    pieces = [data] if isinstance(data, bytes) else list(data)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    started = time.monotonic()
    raw = bytearray()
    closed = False
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((host, port))
        for i, piece in enumerate(pieces):
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            if segment_gap and i < len(pieces) - 1:
                time.sleep(segment_gap)
        deadline = started + timeout
        last = time.monotonic()
        sock.setblocking(False)
        while True:
            now = time.monotonic()
            wait = min(deadline - now, last + quiet - now)
            if wait <= 0:
                break
            r, _, _ = select.select([sock], [], [], wait)
            if not r:
                continue
            try:
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
            last = time.monotonic()
    responses, malformed = parse_responses(bytes(raw), methods)
    return Exchange(bytes(raw), closed, responses, malformed, time.monotonic() - started)


# -- upstream side ------------------------------------------------------------------

#: (method, target, headers, body, complete): one request an upstream received.
UpstreamRequest = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]


@dataclass
class UpstreamParse:
    """What an upstream connection's bytes are, to h11."""

    requests: list[UpstreamRequest] = field(default_factory=list)
    """(method, target, headers, body, complete) per request."""
    error: str | None = None


def parse_upstream(raw: bytes) -> UpstreamParse:
    """Parse C{raw} (bytes one upstream connection received) as requests with h11."""
    result = UpstreamParse()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 22)
    conn.receive_data(raw)
    current: list[Any] | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            result.error = f"h11: {e}"
            break
        if event is h11.NEED_DATA or event is h11.PAUSED:
            if event is h11.PAUSED and current is None and conn.their_state is h11.DONE:
                # Pretend we answered, to read the next request on the connection.
                try:
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                    conn.send(h11.EndOfMessage())
                    conn.start_next_cycle()
                    continue
                except h11.LocalProtocolError:
                    break
            break
        if isinstance(event, h11.Request):
            current = [event.method, event.target, list(event.headers.raw_items()), b"", False]
        elif isinstance(event, h11.Data):
            assert current is not None
            current[3] += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            current[4] = True
            result.requests.append(tuple(current))
            current = None
        elif isinstance(event, h11.ConnectionClosed):
            break
    if current is not None:
        result.requests.append(tuple(current))
    return result


# -- TLS upstream -----------------------------------------------------------------


@dataclass
class TLSConnection:
    index: int
    handshake_ok: bool = False
    handshake_error: str | None = None
    sni: str | None = None
    app_bytes: int = 0
    raw_app: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)


class TLSUpstream:
    """
    A TLS HTTP/1.1 server on 127.0.0.1 serving one certificate chain.  It
    answers each request (read with h11) with a small JSON 200, records the
    SNI, whether the handshake completed, and every application byte.
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes, workdir: Path) -> None:
        cert_path = workdir / f"tls-{id(self)}-cert.pem"
        key_path = workdir / f"tls-{id(self)}-key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        self._sni: dict[int, str | None] = {}
        ctx.sni_callback = self._on_sni
        self.context = ctx
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[TLSConnection] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _on_sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: Any) -> None:
        self._sni[id(sslobj)] = name

    def start(self) -> Self:
        t = threading.Thread(target=self._accept_loop, name=f"tls:{self.port}", daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                record = TLSConnection(len(self.connections))
                self.connections.append(record)
            t = threading.Thread(target=self._serve, args=(sock, record), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, record: TLSConnection) -> None:
        sock.settimeout(5.0)
        try:
            try:
                tls = self.context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as e:
                record.handshake_error = f"{type(e).__name__}: {e}"
                # Anything the peer sends after a failed handshake is counted too.
                try:
                    sock.settimeout(0.5)
                    rest = sock.recv(65536)
                    record.raw_app += rest  # not decryptable: raw bytes, should be none
                except OSError:
                    pass
                sock.close()
                return
            record.handshake_ok = True
            record.sni = self._sni.get(id(tls))
            conn = h11.Connection(h11.SERVER)
            with tls:
                while not self._stop.is_set():
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            data = tls.recv(65536)
                        except (ssl.SSLError, OSError):
                            return
                        record.app_bytes += len(data)
                        record.raw_app += data
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.EndOfMessage):
                        body = b'{"ok":true}'
                        out = conn.send(
                            h11.Response(
                                status_code=200,
                                headers=[
                                    ("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))),
                                ],
                            )
                        )
                        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
                        out += conn.send(h11.EndOfMessage()) or b""
                        tls.sendall(out)
                        try:
                            conn.start_next_cycle()
                        except h11.LocalProtocolError:
                            return
                    elif isinstance(event, h11.ConnectionClosed):
                        return
        except (h11.RemoteProtocolError, OSError):
            return
        finally:
            record.done.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(2)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def self_signed_pem(hostname: str = "localhost") -> tuple[bytes, bytes]:
    """A self-signed certificate (not a CA) for C{hostname}, and its key, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# -- what a stopped proxy left behind ----------------------------------------------------


def store_events(db: Path) -> list[dict[str, Any]]:
    """Every row of the embedded store's C{events} table (empty if there is no store)."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in con.execute("SELECT * FROM events")]
        except sqlite3.OperationalError:
            return []
    finally:
        con.close()


def grep_tree(root: Path, needles: Iterable[bytes]) -> list[tuple[str, bytes]]:
    """(file, needle) for every needle found in any file under C{root}, as bytes."""
    needles = list(needles)
    hits: list[tuple[str, bytes]] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for needle in needles:
            if needle in data:
                hits.append((str(path.relative_to(root)), needle))
    return hits
