"""C{/dashboard} when keys are required: a login page, a session, a logout.

L{DashboardGate} stands in front of L{DashboardResource}:

 - C{GET /dashboard/login} is a plain form (no script) where a user pastes
   a key; C{POST /dashboard/login} checks it (a C{read} or C{admin} key) and
   answers 303 to C{/dashboard} with a session cookie (L{DashboardSessions}:
   an opaque id, never the key). A wrong, revoked or C{ingest} key gets the
   form again with why (never the key) and 401 (403 for a key of the wrong
   scope).
 - C{POST /dashboard/logout} ends the session and clears the cookie.
 - The page itself (C{GET /dashboard}) needs a live session or an
   C{Authorization: Bearer} key of C{read} or C{admin} scope; without one it
   is a 303 to the login page. Its static files (script, style) are the
   package's own and are served to anyone who passes the C{Host} guard.

Both posts are same-origin only: a C{Sec-Fetch-Site} other than
C{same-origin}, or an C{Origin} other than this request's own scheme and
C{Host}, is a 403 C{forbidden}. (A client that sends neither header is not
a browser, so no other site can have made it post.) The session cookie is
C{SameSite=Strict}, and C{/api} accepts it on C{GET}/C{HEAD} only
(L{KeyGuardedResource}), so no other site can spend it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ._auth import bearer_key, refusal_message
from ._dashboard import ASSETS, POLICY, DashboardResource, asset
from ._keys import Verdict
from ._sessions import (
    DashboardSessions,
    clear_session_cookie,
    is_secure,
    request_session_id,
    set_session_cookie,
)

__all__ = ["LOGIN_PATH", "DashboardGate", "VerdictSource", "cross_site_refusal"]

#: Where the login form lives.
LOGIN_PATH: Final = b"/dashboard/login"
#: A pasted key is ~50 bytes; a form body beyond this is not a login.
_MAX_FORM: Final = 4096

_log = Logger()


class VerdictSource(Protocol):
    """Verdicts on keys, remembered a short while: the collector's
    L{KeyVerifier}, or an embedded proxy's client-key check."""

    def cached(self, key: str | None) -> Verdict | None:
        """The remembered verdict on C{key}, or None when it must be asked."""

    def check(self, key: str | None) -> Deferred[Verdict]:
        """The verdict on C{key}."""


def cross_site_refusal(request: Request) -> str | None:
    """Why a state-changing browser request did not come from this origin,
    or None when it did (or came from no browser)."""
    site = request.getHeader(b"sec-fetch-site")
    if site is not None and site.strip().lower() != b"same-origin":
        return "this form only accepts posts from its own page (Sec-Fetch-Site)"
    origin = request.getHeader(b"origin")
    if origin is not None:
        scheme = b"https" if is_secure(request) else b"http"
        host = (request.getHeader(b"host") or b"").strip().lower()
        if origin.strip().lower() != scheme + b"://" + host:
            return "this form only accepts posts from its own page (Origin)"
    return None


def _see(request: Request, location: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"see " + location + b"\n"


def _plain_error(request: Request, status: int, kind: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-llmobserve-error", kind.encode())
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"error": {"type": kind, "message": message}}).encode() + b"\n"


def _form_key(request: Request) -> str | None:
    """The C{key} field of a form body (never the query string: a key in
    an address would reach access logs and browser history)."""
    content = request.content
    if content is None:
        return None
    content.seek(0)
    body = content.read(_MAX_FORM + 1)
    if len(body) > _MAX_FORM:
        return None
    fields = parse_qs(body.decode("latin-1"), max_num_fields=8)
    values = fields.get("key") or [""]
    return values[-1].strip() or None


class DashboardGate(Resource):
    """The dashboard behind a login (see the module's docstring).

    @param page: the dashboard's files.
    @param verifier: verdicts on keys (the collector's L{KeyVerifier}, with
        its 2-second cache).
    @param sessions: the logins.
    """

    isLeaf = True

    def __init__(
        self, page: DashboardResource, verifier: VerdictSource, sessions: DashboardSessions
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._page = page
        self._verifier = verifier
        self._sessions = sessions
        self._form: bytes | None = None

    def render(self, request: Request) -> bytes | int:
        rest = [p for p in (request.postpath or []) if p]
        head = rest[0] if len(rest) == 1 else b""
        if head in (b"login", b"logout"):
            if request.method == b"POST":
                refusal = cross_site_refusal(request)
                if refusal is not None:
                    return _plain_error(request, 403, "forbidden", refusal)
                return self._login(request) if head == b"login" else self._logout(request)
            if head == b"login" and request.method in (b"GET", b"HEAD"):
                return self._login_page(request, 200, None)
            request.setHeader(b"allow", b"POST" if head == b"logout" else b"GET, HEAD, POST")
            return _plain_error(request, 405, "method_not_allowed", "use the dashboard's form")
        name = head.decode("utf-8", "replace")
        if name in ASSETS and name != "index.html":
            return self._render_page(request)
        return self._guarded_page(request)

    # the page

    def _render_page(self, request: Request) -> bytes | int:
        result: bytes | int = self._page.render(request)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        return result

    def _guarded_page(self, request: Request) -> bytes | int:
        key = bearer_key(request)
        session_id = None
        if key is None:
            session_id = request_session_id(request)
            key = self._sessions.key_for(session_id)
            if key is None:
                return _see(request, LOGIN_PATH)
        verdict = self._verifier.cached(key)
        if verdict is not None:
            return self._page_for(request, verdict, session_id)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self._verifier.check(key)
        d.addCallback(self._finish, request, gone, self._page_for, session_id)
        d.addErrback(lambda f: _log.failure("dashboard request failed", f))
        return NOT_DONE_YET

    def _page_for(self, request: Request, verdict: Verdict, session_id: str | None) -> bytes | int:
        if verdict.allows("read"):
            return self._render_page(request)
        if session_id is not None:  # the key went away since login
            self._sessions.close(session_id)
            clear_session_cookie(request)
            return _see(request, LOGIN_PATH)
        if verdict.reason is not None:
            return _plain_error(request, 401, "unauthorized", refusal_message(verdict, "read"))
        return _plain_error(request, 403, "forbidden", refusal_message(verdict, "read"))

    # login and logout

    def _login(self, request: Request) -> bytes | int:
        key = _form_key(request)
        if key is None:
            return self._login_page(request, 401, "paste an API key")
        verdict = self._verifier.cached(key)
        if verdict is not None:
            return self._logged_in(request, verdict, key)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self._verifier.check(key)
        d.addCallback(self._finish, request, gone, self._logged_in, key)
        d.addErrback(lambda f: _log.failure("dashboard login failed", f))
        return NOT_DONE_YET

    def _logged_in(self, request: Request, verdict: Verdict, key: str) -> bytes | int:
        if not verdict.allows("read"):
            status = 401 if verdict.reason is not None else 403
            return self._login_page(request, status, refusal_message(verdict, "read"))
        session_id = self._sessions.open(key)
        set_session_cookie(request, session_id, self._sessions.ttl)
        _log.info(
            "dashboard login: key {name} ({scope}, project {project})",
            name=verdict.name,
            scope=verdict.scope,
            project=verdict.project,
        )
        return _see(request, b"/dashboard")

    def _logout(self, request: Request) -> bytes:
        self._sessions.close(request_session_id(request))
        clear_session_cookie(request)
        return _see(request, LOGIN_PATH)

    def _login_page(self, request: Request, status: int, message: str | None) -> bytes:
        if self._form is None:
            self._form = asset("login.html")
        body = self._form
        if message is not None:
            note = f'<p class="error-box" role="alert" id="login-error">{html.escape(message)}</p>'
            body = body.replace(b"<!--message-->", note.encode())
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", POLICY)
        return body

    @staticmethod
    def _finish(
        verdict: Verdict,
        request: Request,
        gone: list[bool],
        then: Callable[[Request, Verdict, Any], bytes | int],
        arg: str | None,
    ) -> None:
        if gone:
            return
        body = then(request, verdict, arg)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            request.write(body)
            request.finish()
