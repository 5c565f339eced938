"""Keys at the collector's doors: the verdict cache and the HTTP wrapper.

L{KeyVerifier} asks the store (in the reader thread, never on the reactor
thread) what a presented key may do, and remembers the answer for at most
L{VERDICT_TTL} seconds: a key revoked with C{llmobserve keys revoke} stops
working on a running collector within that time, and a client presenting
the same key again costs one dict lookup meanwhile.

L{KeyGuardedResource} wraps a resource (C{/api}): a request without a valid
key of the right scope gets 401 C{unauthorized} (403 C{forbidden} for a valid
key whose scope does not cover it) with the error contract; a C{read} key's
project is forced into the request's C{project} parameter, so every query
below returns that project's events only. Kept a wrapper, so other routes
(the dashboard) can be put behind the same check. Given the dashboard's
sessions, it also accepts the session cookie in place of a key, on C{GET}
and C{HEAD} only (a cookie never changes anything: no CSRF), and checks the
session's key like a presented one, so a revoked key ends its sessions.
"""

from __future__ import annotations

import json
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from llmobserve._words import with_article

from ._keys import MISSING, Verdict
from ._sessions import DashboardSessions, clear_session_cookie, request_session_id
from ._store import Store
from ._thread import StoreThread

__all__ = ["VERDICT_TTL", "KeyGuardedResource", "KeyVerifier", "bearer_key", "refusal_message"]

#: Seconds a verdict is remembered (how long a revoked key may still work).
VERDICT_TTL: Final = 2.0
_MAX_CACHED: Final = 4096

_log = Logger()

_MESSAGES: Final = {
    "missing": "an API key is required",
    "unknown": "the API key is not known",
    "revoked": "the API key was revoked",
    "unavailable": "the key store could not be read",
    "session": "the dashboard session has ended; log in again",
}


def refusal_message(verdict: Verdict, scope: str) -> str:
    """Why a verdict refuses C{scope}, never naming the key."""
    if verdict.reason is not None:
        return _MESSAGES.get(verdict.reason, "the API key is not valid")
    return f"{with_article(verdict.scope)} key may not do this (needs {scope} or admin)"


class KeyVerifier:
    """Verdicts on presented keys, cached for L{VERDICT_TTL} seconds.

    @param reader: the store thread that looks keys up.
    @param clock: for the cache's expiry.
    """

    def __init__(self, reader: StoreThread, clock: IReactorTime, ttl: float = VERDICT_TTL) -> None:
        self._reader = reader
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Verdict]] = {}
        #: store look-ups made (the cache's misses), for tests
        self.lookups = 0

    def cached(self, key: str | None) -> Verdict | None:
        """The remembered verdict on C{key}, or None when it must be asked."""
        if not key:
            return MISSING
        entry = self._cache.get(key)
        if entry is None or entry[0] <= self._clock.seconds():
            return None
        return entry[1]

    def forget(self) -> None:
        """Drop every remembered verdict (a key was revoked here)."""
        self._cache.clear()

    def check(self, key: str | None) -> Deferred[Verdict]:
        """The verdict on C{key}: at once when remembered, else from the store."""
        verdict = self.cached(key)
        if verdict is not None:
            return succeed(verdict)
        assert key is not None
        self.lookups += 1
        d: Deferred[Verdict] = self._reader.submit(lambda store: _verify(store, key))
        d.addCallbacks(self._remember, self._unavailable, callbackArgs=(key,))
        return d

    def _remember(self, verdict: Verdict, key: str) -> Verdict:
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (self._clock.seconds() + self._ttl, verdict)
        return verdict

    def _unavailable(self, failure: Failure) -> Verdict:
        _log.failure("key lookup failed", failure)
        return Verdict("unavailable")


def _verify(store: Store, key: str) -> Verdict:
    return store.keys.verify(key)


def bearer_key(request: Request) -> str | None:
    """The key of C{Authorization: Bearer KEY}, or None."""
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    kind, _, key = raw.decode("latin-1").strip().partition(" ")
    return (key.strip() or None) if kind.lower() == "bearer" else None


def _refuse(
    request: Request, status: int, kind: str, message: str, reason: str | None = None
) -> bytes:
    error = {"type": kind, "message": message}
    if reason is not None:
        error["reason"] = reason
    body = json.dumps({"error": error}).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-llmobserve-error", kind.encode())
    request.setHeader(b"cache-control", b"no-store")
    if status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="llmobserve"')
    return body


def _budget_link_path(postpath: list[bytes], reading: bool) -> bool:
    """C{GET /api/budgets}, C{GET /api/limits} and C{POST
    /api/budgets/grants}: a proxy linked to the collector reads the budgets
    and rate limits and takes its slices of them with its link key
    (C{ingest}), as read and admin keys may."""
    if postpath[:1] == [b"limits"]:
        return reading
    return postpath[:1] == [b"budgets"] and (reading or postpath[1:] == [b"grants"])


class KeyGuardedResource(Resource):
    """Serves C{inner} only to requests with a key whose scope covers them.

    C{GET}/C{HEAD} need C{read}; anything else, and every path under one of
    C{admin_paths}, needs C{admin}. A non-admin key's project scopes the
    request (its C{project} parameter is replaced by the key's).
    C{GET whoami} below it answers any valid key's name, project and scope
    (how a proxy checks its clients' keys with the collector).

    @param inner: the guarded tree (its children are found below this one).
    @param verifier: the verdicts.
    @param admin_paths: first path segments below this one that need C{admin}.
    @param admin_only: every request needs C{admin} (a tree that does not
        honour the C{project} parameter).
    @param sessions: the dashboard's logins, whose cookie stands for their
        key on C{GET}/C{HEAD} (a C{Bearer} key wins over a cookie).
    """

    isLeaf = True

    def __init__(
        self,
        inner: Resource,
        verifier: KeyVerifier,
        admin_paths: frozenset[bytes] = frozenset(),
        admin_only: bool = False,
        sessions: DashboardSessions | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._inner = inner
        self._verifier = verifier
        self._admin_paths = admin_paths
        self._admin_only = admin_only
        self._sessions = sessions

    def render(self, request: Request) -> bytes | int:
        reading = request.method in (b"GET", b"HEAD")
        scope = "read" if reading else "admin"
        if request.postpath == [b"whoami"] and not self._admin_only:
            scope = "any"
        elif not self._admin_only and _budget_link_path(request.postpath or [], reading):
            scope = "link"
        elif self._admin_only or (request.postpath and request.postpath[0] in self._admin_paths):
            scope = "admin"
        key = bearer_key(request)
        session_id = None
        if key is None and self._sessions is not None and request.method in (b"GET", b"HEAD"):
            session_id = request_session_id(request)
            if session_id is not None:
                key = self._sessions.key_for(session_id)
                if key is None:
                    clear_session_cookie(request)
                    return self._decide(request, Verdict("session"), scope, None)
        verdict = self._verifier.cached(key)
        if verdict is not None:
            return self._decide(request, verdict, scope, session_id)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self._verifier.check(key)
        d.addCallback(self._decided, request, scope, gone, session_id)
        d.addErrback(lambda f: _log.failure("guarded request failed", f))
        return NOT_DONE_YET

    def _decided(
        self,
        verdict: Verdict,
        request: Request,
        scope: str,
        gone: list[bool],
        session_id: str | None,
    ) -> None:
        if gone:
            return
        body = self._decide(request, verdict, scope, session_id)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            request.write(body)
            request.finish()

    def _decide(
        self, request: Request, verdict: Verdict, scope: str, session_id: str | None
    ) -> bytes | int:
        if verdict.reason is not None:
            if session_id is not None and self._sessions is not None:
                self._sessions.close(session_id)  # its key was revoked: so is the login
                clear_session_cookie(request)
            message = refusal_message(verdict, scope)
            return _refuse(request, 401, "unauthorized", message, verdict.reason)
        if scope == "any":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            who = {"name": verdict.name, "project": verdict.project, "scope": verdict.scope}
            return json.dumps(who).encode() + b"\n"
        link = scope == "link" and verdict.scope == "ingest"
        if scope == "link":  # what a proxy's link key may also do
            scope = "ingest" if link else "read"
        if not verdict.allows(scope):
            return _refuse(request, 403, "forbidden", refusal_message(verdict, scope))
        # A proxy's link key reads every budget and limit (its clients' keys
        # may be of any project: it enforces them all); any other non-admin
        # key is held to its project
        if verdict.scope != "admin" and verdict.project is not None and not link:
            if request.args is None:
                request.args = {}
            request.args[b"project"] = [verdict.project.encode("utf-8")]
        child = getChildForRequest(self._inner, request)
        result: bytes | int = child.render(request)
        return result
