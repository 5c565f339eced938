"""Tunables of the forwarding path, with the defaults RELIABILITY.md suggests."""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_MAX_BODY", "RelayConfig"]

#: Request bodies stream upstream (a bounded copy is kept for the parsers),
#: so the default admits what the providers' upload APIs take (OpenAI Files
#: 512 MB, Gemini's File API 2 GB); C{--max-body} sets a lower cap.
DEFAULT_MAX_BODY = 2 * 1024 * 1024 * 1024


@attrs.frozen
class RelayConfig:
    """Limits and timeouts for one exchange (seconds and bytes).

    There is deliberately no total-request timeout: a long LLM call or
    stream runs as long as bytes keep flowing.
    """

    connect_timeout: float = 10.0  # TCP connect to the upstream
    header_timeout: float = 600.0  # request sent -> response headers (reasoning models think)
    idle_timeout: float = 300.0  # no upstream byte for this long mid-response
    client_write_timeout: float = 60.0  # a client that stops reading a response
    max_body: int = DEFAULT_MAX_BODY  # request body limit -> 413
    max_response_head: int = 64 * 1024  # response header bytes -> 502
    pool_idle_timeout: float = 30.0  # idle keep-alive upstream connections
    max_idle_per_host: int = 64
    request_tap: int = 1024 * 1024  # request body bytes kept for the parsers
    response_tap_head: int = 1024 * 1024  # response bytes kept from the start
    response_tap_tail: int = 256 * 1024  # and from the end of longer bodies
    client_buffer: int = 256 * 1024  # request bytes held while the upstream connects
    add_via: bool = True  # Via: 1.1 llmobserve upstream (also the loop guard)
