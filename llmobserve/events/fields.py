"""The event's field names (contract: DESIGN.md, "The event").

One list for everything that writes or reads events: the proxy's event
record, the collector's store and the command line. Pure data, no imports.
"""

from typing import Final

__all__ = ["EVENT_FIELDS"]

#: DESIGN.md's event fields, in order, plus C{kind} (call, span or gap).
EVENT_FIELDS: Final = (
    "id",
    "kind",
    "ts",
    "duration_ms",
    "ttfb_ms",
    "overhead_ms",
    "method",
    "host",
    "path",
    "status",
    "outcome",
    "provider",
    "endpoint",
    "model",
    "streamed",
    "usage",
    "usage_source",
    "cost_usd",
    "price_ref",
    "request_bytes",
    "response_bytes",
    "graphql",
    "context",
)
