"""From a L{Transaction} to the parsers' C{Exchange}; the parsers' entry point.

Runs in a parse worker thread: decoding the raw header pairs into a
lower-case C{Mapping[str, str]} is work the reactor never does, and it is
done only for the headers a parser reads (most never look at the request's,
and read a few of the response's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

from llmobserve.events._record import UsageLike, header_value, headers_to_mapping
from llmobserve.transaction import RawHeaders, Transaction
from parsers import Exchange, analyse, construct

__all__ = ["AnalyseFn", "HeaderMap", "default_analyse", "exchange_from_transaction"]

#: C{parsers.analyse} or a stand-in (tests inject slow and raising ones).
#: The real one is total and never raises; the pipeline guards anyway.
AnalyseFn = Callable[[Exchange], UsageLike | None]


class HeaderMap(Mapping[str, str]):
    """Raw header pairs read as L{headers_to_mapping}'s map, decoded on first use.

    C{get} before anything else has decoded the map looks for that one name
    in the raw pairs instead (names of another length are skipped without
    decoding): parsers read two or three response headers (content type and
    encoding, a count here and there) of the twenty-odd a provider sends,
    and decoding them all cost ~0.25 us a header. One exchange is parsed by
    one thread, so the lazy decoding needs no lock.
    """

    __slots__ = ("_map", "_pairs")

    def __init__(self, pairs: RawHeaders) -> None:
        self._pairs = pairs
        self._map: dict[str, str] | None = None

    def _decoded(self) -> dict[str, str]:
        if self._map is None:
            self._map = headers_to_mapping(self._pairs)
        return self._map

    def __getitem__(self, name: str) -> str:
        return self._decoded()[name]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]  # Mapping.get's overloads, same behaviour
        if self._map is not None:
            return self._map.get(name, default)
        found = header_value(self._pairs, name)
        return default if found is None else found

    def __contains__(self, name: object) -> bool:
        return name in self._decoded()

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, HeaderMap):
            other = other._decoded()
        return self._decoded() == other

    __hash__ = None  # type: ignore[assignment]  # a mapping, like dict

    def __repr__(self) -> str:
        return f"HeaderMap({self._decoded()!r})"


def exchange_from_transaction(txn: Transaction) -> Exchange:
    """The parsers' view of one exchange."""
    return construct(  # Exchange(...), minus a setattr per field (every field is named)
        Exchange,
        method=txn.method,
        scheme=txn.scheme,
        host=txn.host,
        port=txn.port,
        path=txn.path,
        query=txn.query,
        request_headers=HeaderMap(txn.request_headers),
        request_body=txn.request_body,
        request_body_truncated=txn.request_body_truncated,
        status=txn.status,
        response_headers=HeaderMap(txn.response_headers),
        response_body=txn.response_body,
        response_body_truncated=txn.response_body_truncated,
        started_at=txn.started_at,
        provider_hint=txn.provider_hint,
    )


def default_analyse(no_estimate: frozenset[str] = frozenset()) -> AnalyseFn:
    """C{parsers.analyse}, warmed up; with C{no_estimate} (provider ids set
    to C{--stream-usage ...=off}), an C{analyse} that does not estimate them.

    The first call loads the price data (about 15 ms and tens of thousands
    of objects): done here, at start-up, it is not paid by the first call
    and the objects are there before the proxy freezes its start-up heap
    out of the cyclic collector's reach (see C{llmobserve.proxy._tap}).
    """
    try:
        analyse(_WARM_UP)
    except Exception:
        pass  # a warm-up only: the real calls report their own errors
    if no_estimate:
        return functools.partial(analyse, no_estimate=no_estimate)
    return analyse  # a UsageRecord is a UsageLike (mypy checks it here)


_WARM_UP = Exchange(
    method="POST",
    scheme="https",
    host="api.openai.com",
    port=443,
    path="/v1/chat/completions",
    query="",
    request_headers={"content-type": "application/json"},
    request_body=b'{"model":"gpt-4o-mini"}',
    request_body_truncated=False,
    status=200,
    response_headers={"content-type": "application/json"},
    response_body=b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":1,"completion_tokens":1}}',
    response_body_truncated=False,
    started_at=0.0,
)
