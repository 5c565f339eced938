"""From a L{Transaction} to the parsers' C{Exchange}; the parsers' entry point.

Runs in a parse worker thread: decoding the raw header pairs into a
lower-case C{Mapping[str, str]} is work the reactor never does.
"""

from __future__ import annotations

from collections.abc import Callable

from llmobserve.events._record import UsageLike, headers_to_mapping
from llmobserve.proxy.transaction import Transaction
from parsers import Exchange, analyse

__all__ = ["AnalyseFn", "default_analyse", "exchange_from_transaction"]

#: C{parsers.analyse} or a stand-in (tests inject slow and raising ones).
#: The real one is total and never raises; the pipeline guards anyway.
AnalyseFn = Callable[[Exchange], UsageLike | None]


def exchange_from_transaction(txn: Transaction) -> Exchange:
    """The parsers' view of one exchange."""
    return Exchange(
        method=txn.method,
        scheme=txn.scheme,
        host=txn.host,
        port=txn.port,
        path=txn.path,
        query=txn.query,
        request_headers=headers_to_mapping(txn.request_headers),
        request_body=txn.request_body,
        request_body_truncated=txn.request_body_truncated,
        status=txn.status,
        response_headers=headers_to_mapping(txn.response_headers),
        response_body=txn.response_body,
        response_body_truncated=txn.response_body_truncated,
        started_at=txn.started_at,
        provider_hint=txn.provider_hint,
    )


def default_analyse() -> AnalyseFn:
    """C{parsers.analyse}."""
    return analyse  # a UsageRecord is a UsageLike (mypy checks it here)
