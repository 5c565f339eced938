"""A DNS server on 127.0.0.1 for real-process tests (RELIABILITY.md's C{fake_dns}).

It answers from a table the test can change at any time (L{FakeDNS.set}):
A queries with a name's IPv4 addresses, AAAA queries with its IPv6 ones,
TTLs 0; unknown names get NXDOMAIN. Every query is recorded. It runs in a
thread of the test process and uses C{twisted.names.dns} only to encode and
decode messages (no reactor).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

from twisted.names import dns

__all__ = ["FakeDNS"]


class FakeDNS:
    """Use as a context manager; C{server} is the C{--dns-server} value."""

    def __init__(self, records: Mapping[str, Sequence[str]]) -> None:
        self._records = {name: list(addresses) for name, addresses in records.items()}
        self._lock = threading.Lock()
        self.queries: list[tuple[str, str]] = []  # (name, "A" / "AAAA" / ...)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-dns", daemon=True)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: Sequence[str]) -> None:
        """Answer C{name} with C{addresses} from now on (a rebinding server)."""
        with self._lock:
            self._records[name] = list(addresses)

    def lookups(self, name: str, kind: str = "A") -> int:
        with self._lock:
            return sum(1 for q in self.queries if q == (name, kind))

    def __enter__(self) -> FakeDNS:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self._answer(data)
            except Exception:  # a message we cannot read: no answer, as a server would
                continue
            self._sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> bytes:
        query = dns.Message()
        query.fromStr(data)
        reply = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes)
        reply.recAv = 1
        reply.queries = query.queries
        for question in query.queries:
            name = question.name.name.decode("ascii").lower().rstrip(".")
            kind = dns.QUERY_TYPES.get(question.type, str(question.type))
            with self._lock:
                self.queries.append((name, kind))
                addresses = self._records.get(name)
            if addresses is None:
                reply.rCode = dns.ENAME
                continue
            for address in addresses:
                if question.type == dns.A and ":" not in address:
                    record: dns.IEncodableRecord = dns.Record_A(address, ttl=0)
                elif question.type == dns.AAAA and ":" in address:
                    record = dns.Record_AAAA(address, ttl=0)
                else:
                    continue
                reply.answers.append(
                    dns.RRHeader(question.name.name, question.type, dns.IN, 0, record, auth=True)
                )
        return reply.toStr()
