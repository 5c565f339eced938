"""From a L{Transaction} to the parsers' C{Exchange}, and the parsers' entry point.

C{parsers} is sans-I/O and has a fixed interface (C{Exchange},
C{UsageRecord}, C{analyse}); while it is being written this module falls
back to a stand-in C{Exchange} with the same fields and to no parser at all,
so the pipeline (which takes its C{analyse} as an argument anyway) runs and
is tested either way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmobserve.events._record import UsageLike, headers_to_mapping
from llmobserve.proxy.transaction import Transaction

__all__ = ["AnalyseFn", "StandInExchange", "default_analyse", "exchange_from_transaction"]

#: The parsers' entry point: total, thread-safe, never raises (we still guard).
AnalyseFn = Callable[[Any], UsageLike | None]


@dataclass(frozen=True)
class StandInExchange:
    """The fields of C{parsers.Exchange}, used only when parsers lacks it."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    request_headers: Mapping[str, str]
    request_body: bytes
    request_body_truncated: bool
    status: int | None
    response_headers: Mapping[str, str]
    response_body: bytes
    response_body_truncated: bool
    started_at: float
    provider_hint: str | None = None


def _parsers_attr(name: str) -> Any:
    try:
        module = importlib.import_module("parsers")
    except ImportError:
        return None
    return getattr(module, name, None)


_Exchange: Callable[..., Any] = _parsers_attr("Exchange") or StandInExchange


def exchange_from_transaction(txn: Transaction) -> Any:
    """The parsers' view of one exchange; runs in the worker thread."""
    return _Exchange(
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


def _no_parser(exchange: Any) -> None:
    return None


def default_analyse() -> AnalyseFn:
    """C{parsers.analyse}, or a stand-in that finds no usage."""
    analyse: AnalyseFn | None = _parsers_attr("analyse")
    return analyse if analyse is not None else _no_parser
