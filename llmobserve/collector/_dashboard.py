"""C{/dashboard}: the page, its script and its style, served from the
package's own files (C{llmobserve/collector/dashboard/}): no CDN, no build
step. The page reads C{/api/*} of the same origin; C{since} and C{until}
in its address are checked here too, so a bad window is a 400 at once.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Final

from twisted.web.resource import Resource
from twisted.web.server import Request

from ._timespec import TimeSpecError, parse_time

__all__ = ["ASSETS", "POLICY", "DashboardResource", "asset"]

#: File name -> content type of everything the page needs.
ASSETS: Final[dict[str, bytes]] = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "chart.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}

#: Only this origin's own scripts, styles and API: the page shows labels
#: that applications chose, so nothing else may run.
POLICY: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def asset(name: str) -> bytes:
    """The bytes of one of the dashboard's files."""
    return (resources.files("llmobserve.collector") / "dashboard" / name).read_bytes()


def _json_error(request: Request, status: int, kind: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"error": {"type": kind, "message": message}}).encode() + b"\n"


class DashboardResource(Resource):
    """C{GET /dashboard} (the page) and C{GET /dashboard/NAME} (its assets).

    @param with_logout: the page shows its C{Log out} button (the page is
        behind a login, L{llmobserve.collector._login.DashboardGate}).
    """

    isLeaf = True

    def __init__(self, with_logout: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._cache: dict[str, bytes] = {}
        self._with_logout = with_logout

    def _file(self, name: str) -> bytes:
        body = asset(name)
        if name == "index.html" and self._with_logout:
            body = body.replace(b'id="logout" hidden', b'id="logout"')
        return body

    def render_GET(self, request: Request) -> bytes:
        rest = [p for p in (request.postpath or []) if p]
        name = "index.html" if not rest else rest[0].decode("utf-8", "replace")
        if rest == [b"login"]:  # no keys required here: no login, the page is open
            request.setResponseCode(303)
            request.setHeader(b"location", b"/dashboard")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"see /dashboard\n"
        if len(rest) > 1 or name not in ASSETS:
            return _json_error(request, 404, "not_found", "no such dashboard file; see /dashboard")
        if name == "index.html":
            for key in (b"since", b"until"):
                values = (request.args or {}).get(key)
                if values and values[-1]:
                    try:
                        parse_time(values[-1].decode("utf-8"))
                    except (TimeSpecError, UnicodeDecodeError) as e:
                        return _json_error(request, 400, "bad_request", str(e))
        body = self._cache.get(name)
        if body is None:
            body = self._cache[name] = self._file(name)
        request.setHeader(b"content-type", ASSETS[name])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", POLICY)
        return body
