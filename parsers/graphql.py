"""GraphQL: detection, and the shape of an operation, read with graphql-core's parser
(in L{parsers._graphql_document}, imported on the first GraphQL call).

Complexity score (documented in docs/PRICES.md): every field costs 1, and
the cost of a field's sub-selection is multiplied by the page size it asks
for (the first of its C{first}, C{last}, C{limit}, C{top}, C{pageSize},
C{per_page} arguments given as an integer or as a variable's integer
value; 1 when none). Fragments are expanded (each at most once per path).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from ._call import Call
from ._draft import UsageDraft, as_number, get_path
from ._records import Exchange
from .jsonbody import BodyError, loads

__all__ = ["graphql_request", "parse_graphql"]

_KEYS = frozenset({"query", "variables", "operationName", "extensions"})
_STARTS = ("{", "query", "mutation", "subscription", "fragment", "#")


def _looks_like_document(text: object) -> bool:
    return isinstance(text, str) and text.lstrip().startswith(_STARTS)


def graphql_request(call: Call) -> dict[str, Any] | None:
    """The GraphQL request of C{call} ({query, variables, operationName}), or None.

    Detected by path (a C{graphql} segment), by C{application/graphql}
    content type, or by a JSON body of exactly the GraphQL-over-HTTP shape.
    """
    ex = call.exchange
    ctype = ex.request_headers.get("content-type", "").lower()
    on_path = "graphql" in ex.path.lower().split("/")
    if ctype.startswith("application/graphql") and not ctype.startswith(
        "application/graphql-response"
    ):
        text = call.request_body.decode("utf-8", "replace")
        return {"query": text} if _looks_like_document(text) else None
    if ex.method.upper() == "GET" and on_path and ex.query:
        params = parse_qs(ex.query, max_num_fields=50)
        query = params.get("query", [None])[0]
        if _looks_like_document(query):
            request: dict[str, Any] = {"query": query}
            name = params.get("operationName", [None])[0]
            if name:
                request["operationName"] = name
            variables = params.get("variables", [None])[0]
            if variables:
                try:
                    request["variables"] = loads(variables)
                except BodyError:
                    pass
            return request
        return None
    body = call.request_body
    if not on_path and (b'"query"' not in body[:4096] and b'"extensions"' not in body[:4096]):
        return None
    value = call.request_json()
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0]  # a batch: describe the first operation
    if not isinstance(value, dict) or not value:
        return None
    if not set(value) <= _KEYS:
        return None
    query = value.get("query")
    if _looks_like_document(query):
        return value
    persisted = get_path(value, "extensions", "persistedQuery")
    if query is None and isinstance(persisted, dict) and (on_path or "operationName" in value):
        return value
    return None


def parse_graphql(call: Call, draft: UsageDraft, request: dict[str, Any]) -> None:
    """Describe the GraphQL operation and its response in C{draft.graphql}."""
    info: dict[str, Any] = {}
    variables = request.get("variables")
    info["variables_count"] = len(variables) if isinstance(variables, dict) else 0
    name = request.get("operationName")
    query = request.get("query")
    if isinstance(query, str):
        from ._graphql_document import describe  # graphql-core: loaded on first use

        describe(
            query,
            name if isinstance(name, str) else None,
            variables if isinstance(variables, dict) else {},
            info,
            draft,
        )
    else:
        info["operation_type"] = None
        info["operation_name"] = name if isinstance(name, str) else None
        info["persisted_query"] = True
    _response(call, info, draft)
    draft.graphql = info
    if draft.endpoint is None:
        draft.endpoint = info.get("operation_type") or "graphql"


def _response(call: Call, info: dict[str, Any], draft: UsageDraft) -> None:
    info["data_bytes"] = len(call.body)
    info["error_count"] = 0
    if not call.body or call.body.lstrip()[:1] != b"{":
        return
    try:
        body = call.json()
    except BodyError as exc:
        draft.error(str(exc))
        return
    if not isinstance(body, dict):
        return
    errors = body.get("errors")
    if isinstance(errors, list):
        info["error_count"] = len(errors)
    cost = get_path(body, "extensions", "cost")
    reported: float | None = None
    if isinstance(cost, dict):  # Shopify-style
        reported = as_number(cost.get("actualQueryCost"))
        if reported is None:
            reported = as_number(cost.get("requestedQueryCost"))
        throttle = cost.get("throttleStatus")
        if isinstance(throttle, dict):
            info["throttle_status"] = {
                k: v
                for k, v in throttle.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
    elif cost is not None:
        reported = as_number(cost)
    if reported is None:
        complexity = get_path(body, "extensions", "complexity")
        if isinstance(complexity, dict):
            complexity = complexity.get("score", complexity.get("cost"))
        reported = as_number(complexity)
    if reported is None:
        reported = as_number(get_path(body, "data", "rateLimit", "cost"))  # GitHub
    if reported is not None:
        info["reported_cost"] = reported


def graphql_figures(
    method: str,
    path: str,
    query: str,
    content_type: str,
    body: bytes,
) -> dict[str, Any] | None:
    """Depth, field count and complexity of a GraphQL request, before it is sent.

    None when the request is not GraphQL; otherwise the C{graphql} map of
    the event (C{depth}, C{field_count}, C{complexity}, ...), with
    C{error} set when the document could not be read (too large, nested
    too deeply, a syntax error, a persisted query with no text).
    """
    exchange = Exchange(
        method=method,
        scheme="https",
        host="",
        port=443,
        path=path,
        query=query,
        request_headers={"content-type": content_type},
        request_body=body,
        request_body_truncated=False,
        status=None,
        response_headers={},
        response_body=b"",
        response_body_truncated=False,
        started_at=0.0,
    )
    call = Call(exchange, None)
    request = graphql_request(call)
    if request is None:
        return None
    info: dict[str, Any] = {}
    text = request.get("query")
    if not isinstance(text, str):
        return {"error": "a persisted query has no text to measure"}
    from ._graphql_document import describe  # graphql-core: loaded on first use

    draft = UsageDraft()
    name = request.get("operationName")
    variables = request.get("variables")
    describe(
        text,
        name if isinstance(name, str) else None,
        variables if isinstance(variables, dict) else {},
        info,
        draft,
    )
    if draft.parse_error is not None:
        info["error"] = draft.parse_error
    return info
