"""CPU the proxy's own Python code spends per relayed request, without sockets.

    python -m bench.hot_path [--requests N] [--repeats K] [--route proxy|base-url] [--keys]

Drives the real front end, resource, relay and upstream pool (the same
classes C{twistd llmobserve} wires together) over in-memory transports and a
fake clock: each request goes in as bytes on a client connection, comes out
as bytes on a pooled upstream connection, which answers with the overhead
benchmark's canned chat completion.  No system calls, no reactor loop: what
is left is the per-request Python work, the part this project controls.
The finished transactions go to a sink that drops them, so the event path
is not included (C{bench.event_path} measures that). With C{--keys} every
request carries an C{X-LLMObserve-Key} that a L{ClientKeyGate} checks, as
on a proxy that requires keys (its verdict cached, the steady state).

Prints the best and median CPU microseconds per request over the repeats.
The figure is steadier than C{bench.overhead}'s on a busy machine and is
meant for before/after comparisons of hot-path changes, next to it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from bench._upstream import JSON_RESPONSE
from bench.overhead import _CHAT_BODY
from llmobserve.proxy._budgets import BudgetLedger
from llmobserve.proxy._channel import ProxyServerFactory
from llmobserve.proxy._config import RelayConfig
from llmobserve.proxy._keygate import ClientKeyGate, ClientVerdict
from llmobserve.proxy._policy import StaticResolver, TargetPolicy
from llmobserve.proxy._relay import RelayServices
from llmobserve.proxy._resource import ProxyResource
from llmobserve.proxy._upstream import UpstreamPool
from llmobserve.proxy._writes import WriteCoalescer
from llmobserve.transaction import ITransactionSink, Transaction

__all__ = ["main"]

_UPSTREAM = "127.0.0.1:8001"


@implementer(ITransactionSink)
class _DropSink:
    store_path = None

    def __init__(self) -> None:
        self.count = 0

    def transaction_finished(self, transaction: Transaction) -> None:
        self.count += 1

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        pass

    def health(self) -> Mapping[str, Any]:
        return {}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return []


def _request(route: str, key: bool = False) -> bytes:
    headers = [
        "Host: 127.0.0.1:9000",
        "Content-Type: application/json",
        "Accept: application/json",
        "Authorization: Bearer sk-bench-not-a-key",
        "User-Agent: llmobserve-bench/1",
        f"Content-Length: {len(_CHAT_BODY)}",
    ]
    if key:
        headers.insert(1, "X-LLMObserve-Key: llmo_bench_not_a_key")
    if route == "proxy":
        target = "/proxy"
        headers.insert(1, f"X-LLMObserve-Target-URL: http://{_UPSTREAM}/v1/chat/completions")
    else:
        target = "/openai/v1/chat/completions"
    return (
        f"POST {target} HTTP/1.1\r\n".encode()
        + "\r\n".join(headers).encode()
        + (b"\r\n\r\n" + _CHAT_BODY)
    )


class _Rig:
    def __init__(
        self, route: str, budgets: BudgetLedger | None = None, sink: Any = None, keys: bool = False
    ) -> None:
        self.reactor = MemoryReactorClock()
        config = RelayConfig()
        policy = TargetPolicy(StaticResolver({}), allow_cidrs=["127.0.0.1/32"])
        coalescer = WriteCoalescer()
        pool = UpstreamPool(
            self.reactor,
            coalescer=coalescer,
            connect_timeout=config.connect_timeout,
            idle_timeout=config.pool_idle_timeout,
            max_head_bytes=config.max_response_head,
        )
        self.sink = sink if sink is not None else _DropSink()
        services = RelayServices(self.reactor, config, policy, pool, self.sink, budgets=budgets)
        gate = ClientKeyGate(self.reactor, _bench_key) if keys else None
        resource = ProxyResource(services, {"openai": f"http://{_UPSTREAM}"}, key_gate=gate)
        site = ProxyServerFactory(resource, self.reactor, coalescer=coalescer)
        peer = IPv4Address("TCP", "127.0.0.1", 50000)
        client: Any = site.buildProtocol(peer)
        self.client = client
        self.client_transport = StringTransport(peerAddress=peer)
        client.makeConnection(self.client_transport)
        self.request = _request(route, keys)
        self.upstream: Any = None
        self.upstream_transport: StringTransport | None = None

    def one(self) -> None:
        self.client.dataReceived(self.request)
        if self.upstream is None:
            host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
            addr = IPv4Address("TCP", host, port)
            self.upstream = factory.buildProtocol(addr)
            self.upstream_transport = StringTransport(peerAddress=addr)
            self.upstream.makeConnection(self.upstream_transport)
        assert self.upstream_transport is not None
        self.upstream_transport.clear()
        self.upstream.dataReceived(JSON_RESPONSE)
        self.client_transport.clear()


def _bench_key(key: str) -> Deferred[ClientVerdict]:
    return succeed(ClientVerdict(None, "bench", "ingest"))


def measure(requests: int, repeats: int, route: str, keys: bool = False) -> list[float]:
    rig = _Rig(route, keys=keys)
    for _ in range(200):  # warm up: pool connection, caches
        rig.one()
    if not rig.client_transport.connected or rig.sink.count != 200:
        raise SystemExit("the rig did not relay its warm-up requests")
    per_request = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.process_time()
        for _ in range(requests):
            rig.one()
        per_request.append((time.process_time() - t0) / requests * 1e6)
    return per_request


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--route", choices=["proxy", "base-url"], default="proxy")
    parser.add_argument("--keys", action="store_true", help="a client key on every request")
    args = parser.parse_args(argv)
    runs = measure(args.requests, args.repeats, args.route, args.keys)
    label = args.route + (", keys" if args.keys else "")
    print(
        f"hot path ({label}): best={min(runs):.1f}us median={statistics.median(runs):.1f}us"
        " CPU per request, in memory (no sockets, no event path)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
