"""Vector and search databases other than Pinecone: operation names and reported units.

Weaviate, Qdrant, Zilliz/Milvus, Chroma, MongoDB Atlas and Algolia. Only
Zilliz (C{cost}, in vCUs) and Algolia (search requests) have a per-call
unit; the others bill capacity or storage, so their calls carry no price.
"""

from __future__ import annotations

from collections.abc import Callable

from ._call import Call
from ._draft import UsageDraft, as_number
from .jsonbody import BodyError

__all__ = ["VECTOR_PARSERS"]

_VERBS = {
    "search": "query",
    "query": "query",
    "points": "upsert",
    "upsert": "upsert",
    "insert": "upsert",
    "delete": "delete",
    "get": "fetch",
    "scroll": "list",
    "count": "stats",
    "objects": "upsert",
    "batch": "upsert",
    "graphql": "query",
    "queries": "query",
    "browse": "list",
    "add": "upsert",
    "find": "query",
    "aggregate": "query",
    "hybrid_search": "query",
    "recommend": "query",
}


def _operation(call: Call) -> str:
    parts = [p for p in call.path.split("/") if p]
    method = call.exchange.method.upper()
    for part in reversed(parts):
        op = _VERBS.get(part.lower())
        if op is not None:
            if op == "upsert" and method == "GET":
                return "fetch"
            if op == "upsert" and method == "DELETE":
                return "delete"
            return op
    if method == "GET":
        return "describe"
    return parts[-1] if parts else "unknown"


def _json(call: Call, draft: UsageDraft) -> object:
    if call.body.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return call.json()
    except BodyError as exc:
        draft.error(str(exc))
        return None


def parse_capacity_billed(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = _operation(call)
    provider = call.provider.id if call.provider else "this provider"
    draft.unpriced_reason = f"{provider} bills capacity or storage, not per request"


def parse_zilliz(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = _operation(call)
    body = _json(call, draft)
    cost = as_number(body.get("cost")) if isinstance(body, dict) else None
    if cost is not None:
        # Zilliz Cloud serverless reports the vCUs a call consumed.
        key = "write_units" if draft.endpoint in ("upsert", "delete") else "read_units"
        draft.set(key, cost)
        draft.price_item = "vcu"
    else:
        draft.unpriced_reason = "no vCU figure in the response (dedicated cluster?)"


def parse_algolia(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = _operation(call)
    if draft.endpoint == "query":
        requests = call.request_field("requests")
        draft.estimate("requests", len(requests) if isinstance(requests, list) else 1)
        draft.price_item = "search"
    elif draft.endpoint in ("upsert", "delete"):
        draft.estimate("requests", 1)
        draft.price_item = "write"
    else:
        draft.unpriced_reason = "not a billed Algolia operation"


VECTOR_PARSERS: dict[str, Callable[[Call, UsageDraft], None]] = {
    "weaviate": parse_capacity_billed,
    "qdrant": parse_capacity_billed,
    "chroma": parse_capacity_billed,
    "mongodb_atlas": parse_capacity_billed,
    "zilliz": parse_zilliz,
    "algolia": parse_algolia,
}
