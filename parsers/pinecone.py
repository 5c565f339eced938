"""Pinecone: control plane, every index host (data plane) and inference.

Read units come from the response's C{usage} block. Upserts report none,
so write units are estimated from the request's records with Pinecone's
unit rule: 1 WU per started KB (1,000 bytes) of records written, at least
5 WUs per request, where a record weighs its id, 4 bytes per dense
dimension, 8 bytes per sparse entry and its metadata as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._call import Call
from ._draft import UsageDraft, as_count, as_number
from .jsonbody import BodyError, loads

__all__ = ["MIN_WRITE_UNITS", "estimate_write_units", "parse_pinecone"]

#: Pinecone's floor on write units per write request.
MIN_WRITE_UNITS = 5
_BYTES_PER_UNIT = 1000

_DATA_PLANE = (
    ("/query", "query"),
    ("/vectors/upsert", "upsert"),
    ("/vectors/fetch_by_metadata", "fetch"),
    ("/vectors/fetch", "fetch"),
    ("/vectors/update", "update"),
    ("/vectors/delete", "delete"),
    ("/vectors/list", "list"),
    ("/describe_index_stats", "stats"),
    ("/upsert", "upsert"),
    ("/search", "query"),
    ("/embed", "embed"),
    ("/rerank", "rerank"),
)

_WRITES = frozenset({"upsert", "update", "delete"})


def _operation(method: str, path: str) -> str:
    path = path.rstrip("/")
    for suffix, op in _DATA_PLANE:
        if path.endswith(suffix):
            return op
    if "/namespaces" in path:
        return "delete" if method == "DELETE" else "describe"
    if (
        path.startswith("/indexes")
        or path.startswith("/collections")
        or path.startswith("/backups")
    ):
        if method == "POST":
            return "create_index"
        if method == "DELETE":
            return "delete_index"
        if method == "PATCH":
            return "configure_index"
        return "describe"
    return path.rsplit("/", 1)[-1] or "unknown"


def parse_pinecone(call: Call, draft: UsageDraft) -> None:
    """Fill C{draft} from a Pinecone exchange."""
    op = _operation(call.exchange.method.upper(), call.path)
    draft.endpoint = op
    body: Any = None
    if call.body and call.body.lstrip()[:1] == b"{":
        try:
            body = call.json()
        except BodyError as exc:
            draft.error(str(exc))
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        reads = usage.get("readUnits", usage.get("read_units"))
        if as_number(reads) is not None:
            draft.set("read_units", reads)
        tokens = usage.get("total_tokens", usage.get("embed_total_tokens"))
        if as_count(tokens) is not None:
            draft.set("input_tokens", tokens)
        rerank = usage.get("rerank_units")
        if as_count(rerank) is not None:
            draft.set("requests", rerank)
    if op in ("embed", "rerank"):
        model = call.request_field("model")
        draft.model = (
            model
            if isinstance(model, str)
            else (
                body.get("model")
                if isinstance(body, dict) and isinstance(body.get("model"), str)
                else None
            )
        )
        draft.price_item = op
        return
    draft.model = None
    if op in ("describe", "stats", "create_index", "delete_index", "configure_index"):
        draft.unpriced_reason = f"pinecone {op} is not billed per request"
        return
    if op in _WRITES and call.exchange.status is not None and call.exchange.status < 300:
        _estimate_writes(call, draft, op, body)
    if isinstance(body, dict):
        count = as_count(body.get("upsertedCount"))
        if count is not None:
            draft.details["upserted_count"] = count
        ns = body.get("namespace")
        if isinstance(ns, str):
            draft.details["namespace"] = ns[:200]
    if op in ("query", "fetch", "list") and "read_units" not in draft.usage:
        draft.flag("no_usage_in_response")
    draft.price_item = "units"


def _estimate_writes(call: Call, draft: UsageDraft, op: str, body: Any) -> None:
    if op == "upsert":
        request = call.request_json()
        records = request.get("vectors") if isinstance(request, dict) else None
        if (
            records is None
            and request is None
            and call.request_body
            and not call.exchange.request_body_truncated
        ):
            records = _ndjson_records(call.request_body)
        if isinstance(records, list):
            draft.estimate("write_units", estimate_write_units(records))
            draft.details["records"] = len(records)
            return
    # Update and delete bill the size of the old and new records, which the
    # request does not carry: only the per-request floor is certain.
    draft.estimate("write_units", MIN_WRITE_UNITS)
    draft.flag("write_units_lower_bound")


def _ndjson_records(raw: bytes) -> list[Any] | None:
    records: list[Any] = []
    for line in raw.splitlines():
        if line.strip():
            try:
                records.append(loads(line))
            except BodyError:
                return None
    return records


def record_bytes(record: object) -> int:
    """The billed size of one record (see the module docstring)."""
    if not isinstance(record, dict):
        return 0
    size = len(str(record.get("id", record.get("_id", ""))).encode())
    values = record.get("values")
    if isinstance(values, list):
        size += 4 * len(values)
    sparse = record.get("sparseValues") or record.get("sparse_values")
    if isinstance(sparse, dict) and isinstance(sparse.get("indices"), list):
        size += 8 * len(sparse["indices"])
    metadata = record.get("metadata")
    if metadata is None and "values" not in record:
        # Integrated-records upsert: every field but the id is stored.
        metadata = {k: v for k, v in record.items() if k not in ("id", "_id")}
    if metadata:
        size += len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    return size


def estimate_write_units(records: list[Any]) -> int:
    """Write units of one upsert request carrying C{records}."""
    total = sum(record_bytes(r) for r in records)
    return max(MIN_WRITE_UNITS, math.ceil(total / _BYTES_PER_UNIT))
