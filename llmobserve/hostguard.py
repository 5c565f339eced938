"""The one C{Host} check that every route of the proxy and the collector
passes before it is routed (contract: DESIGN.md, "A shared deployment").

Browser DNS rebinding: a web page the developer visits re-points its own
name at 127.0.0.1 and then reads C{http://evil.example:9000/api/events}
as same-origin. The browser connects to the proxy, but the request still
says C{Host: evil.example:9000}. So a request is served only when its
C{Host} names this server: an IP literal (a browser connected to that
address, no name involved), C{localhost}, or a name given with
C{--public-name NAME} (a docker compose service, a Kubernetes Service, an
internal DNS name). The port is not checked.

Refusals follow the error contract (C{X-LLMObserve-Error} and a JSON body):
403 C{host_not_allowed} for a foreign name, 400 C{bad_request} for a
missing, repeated or malformed C{Host}. 403 rather than 421: a refused
name is refused on every connection, and a 421 invites a client to retry
the request elsewhere.

L{HostGuard} is the check (bytes in, a refusal or None out; admitted values
are remembered, so a client sending the same C{Host} again costs one set
lookup). L{HostGuardedSite} applies it to a twisted.web C{Site} before
routing; the proxy's own front end calls L{HostGuard.refusal} first thing
in C{ProxyResource.begin_streaming}.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import idna
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["HostGuard", "HostGuardedSite", "HostRefusal", "public_name"]

_LOCAL_NAMES: Final = frozenset({b"localhost"})
_SYNTAX: Final = re.compile(rb"(?:\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME: Final = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_SEEN_MAX: Final = 256  # admitted Host values remembered (a client sends the same few)


@attrs.frozen
class HostRefusal:
    """Why a request's C{Host} is refused: status, error kind, message."""

    status: int
    kind: str
    message: str


_MISSING: Final = HostRefusal(400, "bad_request", "exactly one Host header is required")
_MALFORMED: Final = HostRefusal(400, "bad_request", "malformed Host header")
_FOREIGN: Final = HostRefusal(
    403,
    "host_not_allowed",
    "Host is not this server's own address (an IP literal, localhost, "
    "or a name given with --public-name)",
)


def public_name(text: str) -> str:
    """A C{--public-name} value, canonical: lower case, IDNA, no trailing dot.

    @raise ValueError: not a host name (an IP literal needs no naming).
    """
    name = text.strip().lower().removesuffix(".")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise ValueError(f"{text!r} is not a valid host name") from None
    if len(name) > 253 or _NAME.fullmatch(name) is None:
        raise ValueError(f"{text!r} is not a host name (NAME, without port or scheme)")
    return name


class HostGuard:
    """Decides whether a request's C{Host} names this server.

    @param public_names: names (besides IP literals and C{localhost}) this
        server answers to, as given to C{--public-name}.
    """

    def __init__(self, public_names: Iterable[str] = ()) -> None:
        self.names: frozenset[bytes] = _LOCAL_NAMES | {
            public_name(n).encode("ascii") for n in public_names
        }
        self._seen: set[bytes] = set()

    def refusal(self, hosts: Sequence[bytes]) -> HostRefusal | None:
        """None when C{hosts} (every C{Host} header value of one request)
        is exactly one value naming this server, else why not."""
        if len(hosts) != 1:
            return _MISSING
        raw = hosts[0]
        if raw in self._seen:
            return None
        host = raw.strip().lower()
        if _SYNTAX.fullmatch(host) is None:
            return _MALFORMED
        if host.startswith(b"["):
            name, _, _ = host[1:].partition(b"]")
            if not _is_literal(socket.AF_INET6, name):
                return _MALFORMED
        else:
            name = host.partition(b":")[0].removesuffix(b".")
            if name not in self.names and not _is_literal(socket.AF_INET, name):
                return _FOREIGN
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        self._seen.add(raw)
        return None

    def refusal_for(self, request: Any) -> HostRefusal | None:
        """L{refusal} for a twisted.web request's C{Host} headers."""
        return self.refusal(request.requestHeaders.getRawHeaders(b"host", []))


def _is_literal(family: int, name: bytes) -> bool:
    """True for an IP address (IPv4: a full dotted quad, no C{127.1})."""
    try:
        socket.inet_pton(family, name.decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):
        return False
    return True


class _Refused(Resource):
    """The answer to a refused request, whatever its path and method."""

    isLeaf = True

    def __init__(self, refusal: HostRefusal) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._refusal = refusal

    def render(self, request: Request) -> bytes:
        r = self._refusal
        body = json.dumps({"error": {"type": r.kind, "message": r.message}}).encode()
        request.setResponseCode(r.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-llmobserve-error", r.kind.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


class HostGuardedSite(Site):
    """A C{Site} that routes a request only once its C{Host} passed the guard.

    @param guard: the check; refused requests get its refusal on every path.
    """

    def __init__(self, resource: Resource, guard: HostGuard, **kw: Any) -> None:
        super().__init__(resource, **kw)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self.guard = guard

    def getResourceFor(self, request: Request) -> Any:
        refusal = self.guard.refusal_for(request)
        if refusal is None:
            return super().getResourceFor(request)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        return _Refused(refusal)
