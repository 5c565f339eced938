"""GraphQL depth and complexity limits per host, refused before forwarding."""

from __future__ import annotations

import json

import pytest
from support.inmemory import InMemoryProxy
from twisted.python import usage

from llmobserve.proxy._gqllimits import GraphQLLimit, GraphQLLimits
from llmobserve.proxy._tap import Options
from llmobserve.transaction import Outcome

DEEP = "query { a { b { c { d { e } } } } }"  # depth 5
WIDE = "query { items(first: 100) { tags(first: 100) { name } } }"  # complexity 10101


def limited_proxy(server: str, limit: GraphQLLimit) -> InMemoryProxy:
    proxy = InMemoryProxy(server=server)
    proxy.services.graphql_limits = GraphQLLimits({"127.0.0.1:8080": limit})
    return proxy


def post(proxy: InMemoryProxy, path: bytes, body: bytes) -> bytes:
    channel, transport = proxy.client()
    channel.dataReceived(
        b"POST /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
        b"X-LLMObserve-Target-URL: http://127.0.0.1:8080" + path + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    proxy.reactor.advance(0)
    out: bytes = transport.value()
    return out


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
@pytest.mark.parametrize(
    ("limit", "query", "figure"),
    [
        (GraphQLLimit(max_depth=4), DEEP, "depth 5"),
        (GraphQLLimit(max_complexity=1000), WIDE, "complexity 10101"),
    ],
)
def test_a_query_over_the_limit_is_refused_with_its_figure(
    server: str, limit: GraphQLLimit, query: str, figure: str
) -> None:
    """400 graphql_limit naming the computed figure; nothing upstream; outcome refused."""
    proxy = limited_proxy(server, limit)
    out = post(proxy, b"/graphql", json.dumps({"query": query}).encode())
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"x-llmobserve-error: graphql_limit" in out.lower()
    error = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    assert figure in error["message"]
    assert error["graphql"]["depth"] >= 3
    assert proxy.connects() == 0
    [txn] = proxy.sink.transactions
    assert txn.outcome is Outcome.REFUSED and txn.error == "graphql_limit"


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
def test_queries_within_the_limit_and_other_calls_go_through(server: str) -> None:
    """A shallow query and a request that is not GraphQL are forwarded."""
    proxy = limited_proxy(server, GraphQLLimit(max_depth=4, max_complexity=1000))
    post(proxy, b"/graphql", json.dumps({"query": "query { a { b } }"}).encode())
    upstream = proxy.accept_upstream()
    assert b"POST /graphql" in upstream.received()
    post(proxy, b"/v1/other", b'{"hello": 1}')
    assert proxy.connects() == 2


def test_an_unmeasurable_query_is_refused() -> None:
    """A syntax error (or a persisted query with no text) cannot be measured: refused."""
    proxy = limited_proxy("lean", GraphQLLimit(max_depth=10))
    out = post(proxy, b"/graphql", json.dumps({"query": "query { a { "}).encode())
    assert out.startswith(b"HTTP/1.1 400 ") and b"cannot be measured" in out
    assert proxy.connects() == 0


def test_options() -> None:
    """HOST[:PORT]=N, repeatable; N a whole number."""
    opts = Options()
    opts.parseOptions(
        ["--graphql-max-depth", "api.example.com=8", "--graphql-max-complexity", "h:8080=500"]
    )
    assert opts["graphql-max-depth"] == {"api.example.com": 8}
    assert opts["graphql-max-complexity"] == {"h:8080": 500}
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--graphql-max-depth", "h=deep"])
