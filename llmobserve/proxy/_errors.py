"""The proxy's own error responses (contract: DESIGN.md, "The proxy's HTTP surface")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["ERROR_HEADER", "ProxyError", "error_body", "prepare_error", "write_error"]

ERROR_HEADER = b"X-LLMObserve-Error"


class ProxyError(Exception):
    """A refusal or failure that the proxy answers itself.

    C{kind} is the C{X-LLMObserve-Error} value and the body's C{type}.
    """

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def error_body(kind: str, message: str, extra: Mapping[str, Any] | None = None) -> bytes:
    """The JSON body; C{extra} adds fields to its C{error} object (a 402's C{budget})."""
    return json.dumps({"error": {"type": kind, "message": message, **(extra or {})}}).encode()


def prepare_error(
    request: Any, status: int, kind: str, message: str, extra: Mapping[str, Any] | None = None
) -> bytes:
    """Set the error contract's status and headers on C{request}; return the body."""
    body = error_body(kind, message, extra)
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [b"application/json"])
    headers.setRawHeaders(ERROR_HEADER, [kind.encode()])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    return body


def write_error(
    request: Any, status: int, kind: str, message: str, extra: Mapping[str, Any] | None = None
) -> None:
    """Answer C{request} with the error contract and finish it."""
    request.write(prepare_error(request, status, kind, message, extra))
    request.finish()
