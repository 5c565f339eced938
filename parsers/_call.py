"""L{Call}: one exchange with its bodies decoded, as every provider parser sees it."""

from __future__ import annotations

from typing import Any

from ._draft import UsageDraft
from ._records import Exchange
from .decoding import DEFAULT_DECODED_CAP, decode_body
from .jsonbody import BodyError, loads, loads_object, raw_decode_prefix
from .registry import Provider
from .sse import EventStream, SSEEvent

__all__ = ["Call", "json_or_cut_usage"]

_UNSET: Any = object()
_TAIL_TRIES = 3  # "key" matches tried from the end of a cut body
_TAIL_VALUE = 64 * 1024  # bytes decoded after a match: plenty for a usage object
#: How far from the end a cut body is searched: all of the proxy's copy
#: (1 MiB + 256 KiB), not all of a 16 MiB decoded prefix (milliseconds).
_TAIL_SEARCH = 2 * 1024 * 1024


class Call:
    """The decoded view of an L{Exchange}; request parsing is lazy (often unneeded)."""

    def __init__(
        self,
        exchange: Exchange,
        provider: Provider | None,
        cap: int = DEFAULT_DECODED_CAP,
        *,
        estimate_usage: bool = True,
    ):
        self.exchange = exchange
        self.provider = provider
        #: A stream that reports no usage gets an estimate (C{--stream-usage} is not C{off}).
        self.estimate_usage = estimate_usage
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

    def json(self) -> Any:
        """The response body as JSON; L{BodyError} when it is not.

        A cut body (only the head and tail of it were kept) fails at once,
        without a try: a cut copy is never the JSON it was, and failing on a
        megabyte of it held a parse thread, and the GIL with it, for
        milliseconds (see L{last_objects} for what can still be read).
        """
        return loads(self._whole_body())

    def json_object(self) -> dict[str, Any]:
        """Like L{json}, but the top level must be an object."""
        return loads_object(self._whole_body())

    def _whole_body(self) -> bytes:
        if self.body_truncated:
            raise BodyError(f"response body cut: {len(self.body)} bytes of it kept for parsing")
        return self.body

    def last_objects(self, *keys: str) -> dict[str, dict[str, Any]]:
        """For a cut body: each C{"key": {...}} object found last in what was
        kept of it (the head and the tail; within a few tries from its end),
        by key; empty for a whole body.

        OpenAI and Anthropic responses end with their C{usage}, after the
        bulk (choices, content, embeddings): the part of a long body kept
        from its end still holds it. A C{"key"} inside a JSON string is
        escaped (C{\\"key\\"}) and so never matches.
        """
        found: dict[str, dict[str, Any]] = {}
        if not self.body_truncated:
            return found
        body = self.body
        first = max(0, len(body) - _TAIL_SEARCH)
        for key in keys:
            needle = b'"' + key.encode() + b'"'
            end = len(body)
            for _ in range(_TAIL_TRIES):
                at = body.rfind(needle, first, end)
                if at < 0:
                    break
                value = _object_after(body, at + len(needle))
                if value is not None:
                    found[key] = value
                    break
                end = at
        return found

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


def _object_after(body: bytes, pos: int) -> dict[str, Any] | None:
    """The JSON object after C{: } at C{body[pos:]}, or None."""
    text = body[pos : pos + _TAIL_VALUE].decode("utf-8", "replace")
    colon = len(text) - len(text.lstrip())
    if text[colon : colon + 1] != ":":
        return None
    start = len(text) - len(text[colon + 1 :].lstrip())
    if text[start : start + 1] != "{":
        return None
    try:
        value, _end = raw_decode_prefix(text, start)
    except BodyError:
        return None
    return value if isinstance(value, dict) else None


def json_or_cut_usage(
    call: Call, draft: UsageDraft, keys: tuple[str, ...] = ("usage",)
) -> dict[str, Any]:
    """The response body as a JSON object, for parsers whose usage object
    (named one of C{keys}) ends the response. A cut body (a 50 MB
    embeddings batch) gives C{{key: ...}} for each found last in what was
    kept of it, flagged C{usage_from_cut_body}, when there is one;
    otherwise, and for a body that is not JSON, the error goes on the draft
    and the answer is C{{}}."""
    try:
        return call.json_object()
    except BodyError as exc:
        found = call.last_objects(*keys)
        if found:
            draft.flag("usage_from_cut_body")
            return dict(found)
        draft.error(str(exc))
        return {}
