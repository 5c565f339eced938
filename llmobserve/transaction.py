"""The record of one finished exchange, and the sink interface that receives it.

A leaf module: it imports nothing of C{llmobserve.proxy}, C{events} or
C{collector}, so the packages that share these records (the relay builds
them, the events pipeline consumes them) depend on it and not on each other.

The relay builds exactly one L{Transaction} per client request that reached
the proxy resource and hands it to an L{ITransactionSink} on the reactor
thread. Everything downstream (parsing, pricing, events, the collector link)
plugs in behind that interface and never touches the relay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import attrs
from zope.interface import Attribute, Interface

__all__ = ["Context", "ITransactionSink", "Outcome", "RawHeaders", "Transaction"]

#: Raw header pairs exactly as seen on the wire: name and value bytes.
RawHeaders = tuple[tuple[bytes, bytes], ...]


class Outcome(StrEnum):
    """How an exchange ended (the event's C{outcome} field)."""

    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"  # the upstream answered with status >= 400
    CLIENT_ABORTED = "client_aborted"  # the client went away first
    UPSTREAM_RESET = "upstream_reset"  # the upstream connection broke mid-exchange
    TIMEOUT = "timeout"  # connect, response-header or stream-idle timeout
    PROXY_ERROR = "proxy_error"  # the proxy could not forward it (502: unresolvable, unreachable)
    REFUSED = "refused"  # the proxy refused to forward it (403 policy, 400, 413, 508)
    SHUTDOWN_ABORTED = "shutdown_aborted"  # cut at the drain deadline
    BUDGET_REFUSED = "budget_refused"  # a budget refused it (402), nothing went upstream


@attrs.frozen
class Context:
    """Attribution labels that the SDK sends as C{X-LLMObserve-*} headers."""

    run_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    section: str | None = None
    section_path: str | None = None
    customer_id: str | None = None
    tenant_id: str | None = None
    properties: Mapping[str, str] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The event's C{context} map (only the keys that are set)."""
        out: dict[str, Any] = {
            k: v for k, v in attrs.asdict(self).items() if v is not None and k != "properties"
        }
        if self.properties:
            out["properties"] = dict(self.properties)
        return out


@attrs.frozen
class Transaction:
    """One finished exchange between a client and an upstream, as the proxy saw it.

    Times are in seconds: C{started_at} is wall-clock (unix) time of the
    request's arrival; the durations are monotonic differences. Bodies are
    bounded copies (see C{*_truncated}); byte counts are the full sizes.
    Header pairs are the raw wire bytes: the request headers as forwarded
    upstream (our own and hop-by-hop fields already removed), the response
    headers as the upstream sent them.
    """

    started_at: float
    method: str
    scheme: str
    host: str
    port: int
    path: str  # no query string: it can hold keys
    query: str  # kept for parsers only (e.g. Gemini's ?alt=sse); never logged or stored
    request_headers: RawHeaders
    context: Context
    provider_hint: str | None  # from base-URL mode or --provider-host
    status: int | None  # upstream status, or the proxy's own error status
    response_headers: RawHeaders
    request_body: bytes
    request_body_truncated: bool
    response_body: bytes
    response_body_truncated: bool
    request_bytes: int
    response_bytes: int
    ttfb: float | None  # request start to the upstream's first response byte
    duration: float  # request start to the last byte written to the client
    overhead: float  # time spent in the proxy itself
    outcome: Outcome
    error: str | None = None  # error kind (the X-LLMObserve-Error value) or reason
    project: str | None = None  # the project of the client's X-LLMObserve-Key
    #: the call's budget reservation (C{settle(cost, outcome, status)} on the
    #: reactor once priced; C{flags} for its event), or None
    budget_hold: Any = None


class ITransactionSink(Interface):
    """Receives finished exchanges and span records; reports its own health.

    Every method is called on the reactor thread, must return quickly and
    must never raise: observation never delays or breaks traffic.
    """

    store_path = Attribute(
        "The SQLite file this process stores its events into (the embedded"
        " store: the proxy then serves /api from it), or None when events go"
        " elsewhere (a collector) or nowhere."
    )

    def transaction_finished(transaction: Transaction) -> None:
        """Take ownership of one finished exchange."""

    def spans_received(spans: Sequence[Mapping[str, Any]]) -> None:
        """Take span records posted by the SDK to C{POST /spans}."""

    def health() -> Mapping[str, Any]:
        """Fields merged into C{GET /health}: C{collector}, C{events_waiting}."""

    def metrics() -> Sequence[tuple[str, str, str, float]]:
        """Extra C{/metrics} samples as (name, type, help, value)."""
