"""C{/api/keys}: the key store over HTTP, for C{llmobserve keys --collector URL}.

Mounted only when the collector requires keys, behind the admin scope
(L{KeyGuardedResource}). C{GET /api/keys} lists them (never a key),
C{POST /api/keys} with C{{"name", "project", "scope"}} creates one and
answers it once, C{POST /api/keys/revoke} with C{{"key": NAME|ID|KEY}}
revokes one. Keys travel in bodies, never in URLs (URLs reach access logs).
The store work runs in the reader thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ._auth import KeyVerifier
from ._keys import DEFAULT_PROJECT, KeyStoreError
from ._store import Store, StoreUnavailable
from ._thread import StoreThread

__all__ = ["KeysResource"]

_MAX_BODY = 64 * 1024


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if status >= 400:
        request.setHeader(b"x-llmobserve-error", body["error"]["type"].encode())
    return json.dumps(body).encode() + b"\n"


def _bad(request: Request, message: str) -> bytes:
    return _json(request, 400, {"error": {"type": "bad_request", "message": message}})


def _body(request: Request) -> dict[str, Any]:
    assert request.content is not None
    raw = request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise ValueError("body too large")
    value = json.loads(raw or b"{}")
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("the body must be a JSON object of strings")
    return value


class KeysResource(Resource):
    """C{/api/keys} (see the module's docstring)."""

    isLeaf = True

    def __init__(self, reader: StoreThread, verifier: KeyVerifier) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._reader = reader
        self._verifier = verifier

    def render_GET(self, request: Request) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return _json(request, 404, {"error": {"type": "not_found", "message": "no such key"}})
        return self._run(request, 200, lambda s: {"keys": [k.as_dict() for k in s.keys.list()]})

    def render_POST(self, request: Request) -> bytes | int:
        try:
            body = _body(request)
        except ValueError as e:
            return _bad(request, str(e))
        if request.postpath == [b"revoke"]:
            target = body.get("key", "")

            def revoke(store: Store) -> dict[str, Any]:
                return store.keys.revoke(target).as_dict()

            return self._run(request, 200, revoke, forget=True)
        if request.postpath not in ([], [b""]):
            return _json(request, 404, {"error": {"type": "not_found", "message": "no such key"}})
        name = body.get("name", "")
        project = body.get("project") or DEFAULT_PROJECT
        scope = body.get("scope") or "ingest"

        def create(store: Store) -> dict[str, Any]:
            info, key = store.keys.create(name, project, scope)
            return {**info.as_dict(), "key": key}

        return self._run(request, 201, create)

    def _run(
        self,
        request: Request,
        status: int,
        job: Callable[[Store], Any],
        forget: bool = False,
    ) -> int:
        def done(result: Any) -> None:
            if forget:
                self._verifier.forget()
            request.write(_json(request, status, result))
            request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(KeyStoreError):
                request.write(_bad(request, str(failure.value)))
            elif failure.check(StoreUnavailable):
                error = {"type": "unavailable", "message": str(failure.value)}
                request.write(_json(request, 503, {"error": error}))
            else:
                request.write(
                    _json(
                        request,
                        500,
                        {"error": {"type": "internal", "message": "see the collector log"}},
                    )
                )
            request.finish()

        self._reader.submit(job).addCallbacks(done, failed)
        return NOT_DONE_YET
