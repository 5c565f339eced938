"""The two records that cross the parsers' boundary: L{Exchange} in, L{UsageRecord} out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Exchange", "UsageRecord", "construct"]

_R = TypeVar("_R", "Exchange", "UsageRecord")


def construct(cls: type[_R], /, **fields: Any) -> _R:
    """C{cls(**fields)} for a caller that names every field, built faster.

    A frozen dataclass's generated C{__init__} sets each field through
    C{object.__setattr__}: 1.6 us for L{UsageRecord}'s sixteen, per call.
    Filling the instance dict at once gives the same object (fields, order,
    equality, repr) in a tenth of that. Nothing checks the names or the
    types here (tests do, for both callers): use the plain constructor
    anywhere off the per-exchange path.
    """
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@dataclass(frozen=True)
class Exchange:
    """One finished exchange, as the proxy saw it (bytes in, nothing else).

    Header names are lower case. Bodies may be bounded copies (see the
    C{*_truncated} flags); the response body is the de-chunked wire body,
    possibly still content-encoded. C{started_at} (unix seconds) is the
    date prices are taken at. C{provider_hint} (base-URL mode,
    C{--provider-host}) wins over the host lookup.
    """

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


@dataclass(frozen=True)
class UsageRecord:
    """What one exchange used and cost; field names are DESIGN.md's event fields.

    C{usage} holds only the keys that apply (C{input_tokens} always counts
    every prompt token, cached ones included; C{cached_input_tokens} and
    C{cache_write_tokens} are subsets of it). C{cost_usd} is None when no
    price is known, and C{price_ref} then says why. Fields after
    C{graphql} are additions for demanding users; all have defaults.
    """

    provider: str
    endpoint: str | None
    model: str | None
    streamed: bool
    usage: Mapping[str, int | float]
    usage_source: str
    cost_usd: float | None
    price_ref: str | None
    graphql: Mapping[str, Any] | None = None
    parse_error: str | None = None
    flags: tuple[str, ...] = ()
    #: The model the request asked for, when it differs from C{model} or the response named none.
    request_model: str | None = None
    #: The provider's id for this response (chat completion id, message id, ...).
    response_id: str | None = None
    #: Cost split by direction: C{{"input": ..., "output": ...}} (USD), when priced.
    cost_breakdown: Mapping[str, float] | None = None
    #: Usage keys whose values were estimated rather than reported.
    estimated_keys: tuple[str, ...] = ()
    #: Provider-specific extras worth keeping (service tier, operation details, ...).
    details: Mapping[str, Any] = field(default_factory=dict)
