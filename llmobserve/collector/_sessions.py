"""The dashboard's login sessions: an opaque id in a cookie, the key kept here.

A user logs in on C{/dashboard/login} by pasting a C{read} (or C{admin}) key;
L{DashboardSessions} then hands out a random session id (256 bits, never
derived from the key) for an C{HttpOnly; SameSite=Strict} cookie, and keeps
the key in this process's memory only, so every request made with the
session re-checks the key's verdict (through L{KeyVerifier}'s 2-second
cache): a revoked key ends its sessions within seconds. A session also ends
L{SESSION_TTL} after login, on logout, and when the table is full (the
oldest goes first). Sessions live in memory: a restarted collector asks
everyone to log in again.

Ids are looked up by their SHA-256, so the table holds no usable id either.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

import attrs
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.web.server import Request

__all__ = [
    "COOKIE_NAME",
    "MAX_SESSIONS",
    "SESSION_TTL",
    "DashboardSessions",
    "clear_session_cookie",
    "is_secure",
    "request_session_id",
    "set_session_cookie",
]

#: Seconds a login lasts (a working day and then some).
SESSION_TTL: Final = 12 * 3600.0
#: Sessions held at once; beyond it the oldest is dropped.
MAX_SESSIONS: Final = 10_000
#: The cookie's name (its value is the session id, never a key).
COOKIE_NAME: Final = b"llmobserve_session"


def _index(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


@attrs.define
class _Session:
    key: str
    expires: float


@attrs.define
class DashboardSessions:
    """Session id -> key, each with an expiry.

    @ivar clock: for expiry.
    @ivar ttl: seconds from login to expiry.
    @ivar limit: sessions held at once.
    """

    clock: IReactorTime
    ttl: float = SESSION_TTL
    limit: int = MAX_SESSIONS
    _table: dict[bytes, _Session] = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._table)

    def open(self, key: str) -> str:
        """A new session for C{key} (already verified); its id for the cookie."""
        if len(self._table) >= self.limit:
            self._purge()
            while len(self._table) >= self.limit:
                del self._table[next(iter(self._table))]
        session_id = secrets.token_urlsafe(32)
        self._table[_index(session_id)] = _Session(key, self.clock.seconds() + self.ttl)
        return session_id

    def key_for(self, session_id: str | None) -> str | None:
        """The key behind a live session, or None (unknown, expired: dropped)."""
        if not session_id:
            return None
        index = _index(session_id)
        session = self._table.get(index)
        if session is None:
            return None
        if session.expires <= self.clock.seconds():
            del self._table[index]
            return None
        return session.key

    def key_of(self, request: Request) -> str | None:
        """The key behind C{request}'s session cookie, or None."""
        return self.key_for(request_session_id(request))

    def close(self, session_id: str | None) -> None:
        """End a session (logout, or its key is no longer valid)."""
        if session_id:
            self._table.pop(_index(session_id), None)

    def _purge(self) -> None:
        now = self.clock.seconds()
        for index in [i for i, s in self._table.items() if s.expires <= now]:
            del self._table[index]


def is_secure(request: Request) -> bool:
    """Whether C{request} came over TLS (C{Request.isSecure}, or, for the
    proxy's own request objects, whether their transport is a TLS one)."""
    secure = getattr(request, "isSecure", None)
    if secure is not None:
        return bool(secure())
    return ISSLTransport.providedBy(getattr(request, "transport", None))


def request_session_id(request: Request) -> str | None:
    """The session id in C{request}'s C{Cookie} header, or None.

    Read from the header itself (not C{Request.getCookie}), so the proxy's
    own request objects work too."""
    for raw in request.requestHeaders.getRawHeaders(b"cookie") or []:
        for pair in raw.split(b";"):
            name, sep, value = pair.strip().partition(b"=")
            if sep and name == COOKIE_NAME and value:
                return value.decode("ascii", "replace")
    return None


def _cookie(request: Request, value: bytes, max_age: int) -> None:
    attributes = b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict" % max_age
    if is_secure(request):
        attributes += b"; Secure"
    request.responseHeaders.addRawHeader(b"set-cookie", COOKIE_NAME + b"=" + value + attributes)


def set_session_cookie(request: Request, session_id: str, ttl: float) -> None:
    """Send the session cookie: C{HttpOnly; SameSite=Strict; Path=/}, and
    C{Secure} when the request came over TLS."""
    _cookie(request, session_id.encode("ascii"), int(ttl))


def clear_session_cookie(request: Request) -> None:
    """Tell the browser to forget the session cookie."""
    _cookie(request, b"", 0)
