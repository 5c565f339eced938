"""Pinecone operations and units; GraphQL detection and operation shape."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from parsers_testkit import PINECONE_QUERY, exchange

from parsers import analyse

INDEX = "my-index-abc1234.svc.aped-4627-b74a.pinecone.io"


@pytest.mark.parametrize(
    ("method", "path", "response", "operation", "read_units"),
    [
        ("POST", "/query", PINECONE_QUERY, "query", 6),
        (
            "GET",
            "/vectors/fetch",
            {"vectors": {}, "namespace": "", "usage": {"readUnits": 1}},
            "fetch",
            1,
        ),
        (
            "GET",
            "/vectors/list",
            {"vectors": [{"id": "a"}], "namespace": "", "usage": {"readUnits": 1}},
            "list",
            1,
        ),
        (
            "POST",
            "/records/namespaces/ns/search",
            {"result": {"hits": []}, "usage": {"read_units": 7, "embed_total_tokens": 5}},
            "query",
            7,
        ),
    ],
)
def test_pinecone_reads(
    method: str, path: str, response: dict[str, Any], operation: str, read_units: int
) -> None:
    """Read units come from the response and cost $16 per million."""
    record = analyse(exchange(INDEX, path, response, method=method))
    assert record.provider == "pinecone"
    assert record.endpoint == operation
    assert record.usage["read_units"] == read_units
    assert record.usage_source == "reported"
    assert record.cost_usd == pytest.approx(read_units * 16 / 1e6)
    assert record.price_ref == "llmobserve:pinecone/read_units"


def _vectors(n: int, dim: int, metadata: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        record: dict[str, Any] = {"id": f"doc-{i:04d}", "values": [0.5] * dim}
        if metadata is not None:
            record["metadata"] = metadata
        out.append(record)
    return out


@pytest.mark.parametrize(
    ("n", "dim", "metadata"),
    [(1, 8, None), (100, 1536, {"genre": "drama", "year": 2020}), (10, 768, None)],
)
def test_pinecone_upsert_write_units_estimated(
    n: int, dim: int, metadata: dict[str, Any] | None
) -> None:
    """Upserts report no units: WU = ceil(record bytes / 1000), at least 5; estimated."""
    vectors = _vectors(n, dim, metadata)
    record = analyse(
        exchange(
            INDEX,
            "/vectors/upsert",
            {"upsertedCount": n},
            request={"vectors": vectors, "namespace": "ns"},
        )
    )
    meta_bytes = len(json.dumps(metadata, separators=(",", ":")).encode()) if metadata else 0
    expected = max(5, math.ceil(n * (9 + 4 * dim + meta_bytes) / 1000))
    assert record.endpoint == "upsert"
    assert record.usage == {"write_units": expected}
    assert record.usage_source == "estimated"
    assert record.estimated_keys == ("write_units",)
    assert record.cost_usd == pytest.approx(expected * 4 / 1e6)


def test_pinecone_update_is_a_lower_bound() -> None:
    """Update/delete: the old record size is unknown; the 5-unit floor, flagged."""
    record = analyse(exchange(INDEX, "/vectors/delete", {}, request={"ids": ["a"]}))
    assert record.usage == {"write_units": 5}
    assert "write_units_lower_bound" in record.flags


def test_pinecone_truncated_upsert_request() -> None:
    """A bounded request copy cannot be counted: floor, flagged, never a crash."""
    record = analyse(
        exchange(
            INDEX,
            "/vectors/upsert",
            {"upsertedCount": 100},
            request=b'{"vectors": [{"id": "a", "values": [0.1, 0.2',
            request_truncated=True,
        )
    )
    assert record.usage == {"write_units": 5}
    assert "request_truncated" in record.flags


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("GET", "/indexes", "describe"),
        ("GET", "/indexes/idx", "describe"),
        ("POST", "/indexes", "create_index"),
        ("POST", "/describe_index_stats", "stats"),
    ],
)
def test_pinecone_unbilled_operations(method: str, path: str, operation: str) -> None:
    """Control-plane calls and stats are not billed per request: null cost with a reason."""
    host = "api.pinecone.io" if path.startswith("/indexes") else INDEX
    record = analyse(exchange(host, path, {"indexes": []}, method=method))
    assert record.endpoint == operation
    assert record.cost_usd is None
    assert record.price_ref is not None and record.price_ref.startswith("not priced:")


def test_pinecone_inference_embed() -> None:
    """Pinecone inference: embed tokens counted; no price for them could be
    traced to Pinecone's pricing page (issue 16), so the call is unpriced."""
    record = analyse(
        exchange(
            "api.pinecone.io",
            "/embed",
            {"model": "multilingual-e5-large", "data": [], "usage": {"total_tokens": 1000}},
            request={"model": "multilingual-e5-large", "inputs": []},
        )
    )
    assert record.usage == {"input_tokens": 1000}
    assert record.cost_usd is None
    assert record.price_ref == "no sourced price for pinecone/multilingual-e5-large"


def test_pinecone_query_without_usage_is_missing() -> None:
    """A query whose response lacks usage: missing, flagged, null cost."""
    record = analyse(exchange(INDEX, "/query", {"matches": [], "namespace": ""}))
    assert record.usage_source == "missing"
    assert record.cost_usd is None
    assert "no_usage_in_response" in record.flags


# --- GraphQL --------------------------------------------------------------------------

QUERY = """
query Repos($n: Int!) {
  viewer {
    login
    repositories(first: $n) {
      nodes { name stargazerCount ...Owner }
    }
  }
}
fragment Owner on Repository { owner { login } }
"""


def test_graphql_operation_shape() -> None:
    """Type, name, depth, field count, complexity and variables, from graphql-core's parse."""
    body = {
        "data": {"viewer": {"login": "x", "repositories": {"nodes": []}}},
        "extensions": {
            "cost": {
                "requestedQueryCost": 52,
                "actualQueryCost": 12,
                "throttleStatus": {
                    "maximumAvailable": 1000.0,
                    "currentlyAvailable": 988,
                    "restoreRate": 50.0,
                },
            }
        },
    }
    record = analyse(
        exchange(
            "api.example.com",
            "/graphql",
            body,
            request={"query": QUERY, "variables": {"n": 10}, "operationName": "Repos"},
        )
    )
    assert record.provider == "graphql"
    assert record.endpoint == "query"
    gql = record.graphql
    assert gql is not None
    assert gql["operation_type"] == "query"
    assert gql["operation_name"] == "Repos"
    assert gql["depth"] == 5  # viewer > repositories > nodes > owner > login
    assert gql["field_count"] == 8
    # viewer: 1 + (login 1 + repositories: 1 + 10 * (nodes: 1 + (name + stars + owner(1+1))))
    assert gql["complexity"] == 1 + (1 + (1 + 10 * (1 + (1 + 1 + 2))))
    assert gql["variables_count"] == 1
    assert gql["error_count"] == 0
    assert gql["reported_cost"] == 12
    assert gql["data_bytes"] == len(json.dumps(body))
    assert record.cost_usd is None


def test_graphql_errors_and_mutation() -> None:
    """Errors are counted; mutations are named as such."""
    record = analyse(
        exchange(
            "shop.example.com",
            "/api/graphql",
            {"data": None, "errors": [{"message": "a"}, {"message": "b"}]},
            request={"query": "mutation { addStar(id: 1) { ok } }"},
        )
    )
    assert record.graphql is not None
    assert record.graphql["operation_type"] == "mutation"
    assert record.graphql["error_count"] == 2


@pytest.mark.parametrize(
    ("path", "headers", "body", "detected"),
    [
        ("/v1/query", {}, {"query": "{ a }"}, True),  # strict body shape
        ("/v1/query", {}, {"query": "{ a }", "variables": {}, "extensions": {}}, True),
        ("/v1/query", {}, {"query": "{ a }", "limit": 10}, False),  # extra key: not GraphQL
        ("/search", {}, {"query": "cats and dogs"}, False),  # a search box, not a document
        ("/anything", {"content-type": "application/graphql"}, b"{ a b }", True),
        ("/graphql", {}, [{"query": "{ a }"}], True),  # a batch
    ],
)
def test_graphql_detection(path: str, headers: dict[str, str], body: Any, detected: bool) -> None:
    """Detected by path, content type or the strict GraphQL-over-HTTP body shape only."""
    record = analyse(
        exchange("api.example.com", path, {"data": {}}, request=body, request_headers=headers)
    )
    assert (record.provider == "graphql") is detected


def test_graphql_get_query_string() -> None:
    """GET /graphql?query=... is read from the query string."""
    record = analyse(
        exchange(
            "api.example.com",
            "/graphql",
            {"data": {"a": 1}},
            method="GET",
            query="query=%7B%20a%20%7D&operationName=",
        )
    )
    assert record.graphql is not None and record.graphql["field_count"] == 1


def test_graphql_syntax_error_is_recorded() -> None:
    """A broken document is a parse_error on the record, never an exception."""
    record = analyse(
        exchange(
            "api.example.com",
            "/graphql",
            {"errors": [{"message": "x"}]},
            request={"query": "query { a { "},
        )
    )
    assert record.provider == "graphql"
    assert record.parse_error is not None and "GraphQL syntax error" in record.parse_error


def test_graphql_deep_nesting_and_fragment_cycles() -> None:
    """Very deep queries and self-referencing fragments stay bounded."""
    deep = "query " + "{ a " * 3000 + "}" * 3000
    record = analyse(exchange("api.example.com", "/graphql", {"data": {}}, request={"query": deep}))
    assert record.provider == "graphql"
    cyclic = "query { ...F } fragment F on Q { a ...F }"
    record = analyse(
        exchange("api.example.com", "/graphql", {"data": {}}, request={"query": cyclic})
    )
    assert record.graphql is not None and record.graphql["field_count"] == 1


def test_graphql_on_a_known_provider_keeps_the_provider() -> None:
    """Weaviate's /v1/graphql stays provider weaviate, with the GraphQL fields."""
    record = analyse(
        exchange(
            "abc.c0.us-west3.gcp.weaviate.cloud",
            "/v1/graphql",
            {"data": {"Get": {"Article": []}}},
            request={"query": "{ Get { Article(limit: 5) { title } } }"},
        )
    )
    assert record.provider == "weaviate"
    assert record.graphql is not None and record.graphql["complexity"] == 1 + (1 + 5 * 1)


def test_graphql_core_is_loaded_only_by_a_graphql_call() -> None:
    """A proxy that never sees GraphQL does not carry graphql-core (~5 MB):
    the warmed-up event path has not imported it; the first GraphQL call does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import llmobserve.proxy._tap, llmobserve.events.pipeline\n"
        "from llmobserve.events._exchange import default_analyse\n"
        "default_analyse()\n"
        "assert 'graphql' not in sys.modules, 'graphql-core imported at start-up'\n"
        "from parsers import Exchange, analyse\n"
        "record = analyse(Exchange(method='POST', scheme='https', host='api.example.com', port=443,"
        " path='/graphql', query='', request_headers={'content-type': 'application/json'},"
        " request_body_truncated=False, response_body_truncated=False,"
        ' request_body=b\'{"query": "query Q { a { b } }"}\', status=200,'
        " response_headers={}, response_body=b'{\"data\": {}}', started_at=0.0))\n"
        "assert record.graphql['operation_type'] == 'query', record\n"
        "assert 'graphql' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
