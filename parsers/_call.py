"""L{Call}: one exchange with its bodies decoded, as every provider parser sees it."""

from __future__ import annotations

from typing import Any

from ._records import Exchange
from .decoding import DEFAULT_DECODED_CAP, decode_body
from .jsonbody import BodyError, loads
from .registry import Provider
from .sse import EventStream, SSEEvent

__all__ = ["Call"]

_UNSET: Any = object()


class Call:
    """The decoded view of an L{Exchange}; request parsing is lazy (often unneeded)."""

    def __init__(
        self, exchange: Exchange, provider: Provider | None, cap: int = DEFAULT_DECODED_CAP
    ):
        self.exchange = exchange
        self.provider = provider
        headers = exchange.response_headers
        decoded = decode_body(exchange.response_body, headers.get("content-encoding"), cap)
        self.body = decoded.data
        self.body_error = decoded.error
        #: The response body we parse is incomplete (wire copy or decode cap).
        self.body_truncated = decoded.truncated or exchange.response_body_truncated
        self.content_type = headers.get("content-type", "").lower()
        self._request_body: bytes | None = None
        self._request_json: Any = _UNSET
        self._stream: EventStream | None = None

    @property
    def path(self) -> str:
        return self.exchange.path

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def event_stream(self) -> EventStream:
        """The response body read as an event stream (decoded lazily, from either end)."""
        if self._stream is None:
            self._stream = EventStream(self.body)
        return self._stream

    def is_cut(self, event: SSEEvent) -> bool:
        """True for the last event of a stream that ended mid-event (it may be partial)."""
        return self._stream is not None and event is self._stream.cut

    @property
    def stream_dropped(self) -> int:
        """Oversized lines or events dropped while reading the stream."""
        return self._stream.dropped if self._stream is not None else 0

    @property
    def request_body(self) -> bytes:
        """The request body with its content coding undone (capped)."""
        if self._request_body is None:
            ex = self.exchange
            coding = ex.request_headers.get("content-encoding")
            self._request_body = (
                decode_body(ex.request_body, coding).data if coding else ex.request_body
            )
        return self._request_body

    def request_json(self) -> Any:
        """The request body as JSON, or None when it is not (a truncated copy is not)."""
        if self._request_json is _UNSET:
            value: Any = None
            body = self.request_body
            if (
                body
                and not self.exchange.request_body_truncated
                and body.lstrip()[:1] in (b"{", b"[")
            ):
                try:
                    value = loads(body)
                except BodyError:
                    value = None
            self._request_json = value
        return self._request_json

    def request_field(self, name: str) -> Any:
        """A top-level field of a JSON request body, or None."""
        value = self.request_json()
        return value.get(name) if isinstance(value, dict) else None

    def form_field(self, name: str) -> str | None:
        """A small text field of a multipart/form-data request (e.g. C{model}), or None."""
        ctype = self.exchange.request_headers.get("content-type", "")
        if "multipart/form-data" not in ctype.lower():
            return None
        needle = f'name="{name}"'.encode()
        body = self.request_body
        at = body.find(needle)
        if at < 0:
            return None
        start = body.find(b"\r\n\r\n", at, at + 1024)
        if start < 0:
            return None
        start += 4
        end = body.find(b"\r\n", start, start + 256)
        if end < 0:
            return None
        return body[start:end].decode("utf-8", "replace")
