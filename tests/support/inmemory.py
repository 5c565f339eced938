"""An in-memory proxy: real ProxySite and relay, fake sockets and a fake clock.

Clients are L{HTTPChannel}s on L{StringTransport}s; upstream connections are
made through a L{MemoryReactorClock} and attached to StringTransports by
L{InMemoryProxy.accept_upstream}. Nothing touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConnector
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from llmobserve.proxy._channel import ProxyServerFactory
from llmobserve.proxy._config import RelayConfig
from llmobserve.proxy._policy import StaticResolver, TargetPolicy
from llmobserve.proxy._relay import RelayServices
from llmobserve.proxy._resource import ProxyResource, ProxySite
from llmobserve.proxy._upstream import UpstreamPool
from llmobserve.proxy._writes import WriteCoalescer
from llmobserve.transaction import ITransactionSink, Transaction


@implementer(ITransactionSink)
class ListSink:
    """Keeps every transaction and span it is given."""

    def __init__(self) -> None:
        self.transactions: list[Transaction] = []
        self.spans: list[Mapping[str, Any]] = []

    store_path = None

    def transaction_finished(self, transaction: Transaction) -> None:
        self.transactions.append(transaction)

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        self.spans.extend(spans)

    def health(self) -> Mapping[str, Any]:
        return {"collector": {"state": "test"}, "events_waiting": 0}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return []


class Upstream:
    """One upstream connection the proxy opened: its transport and protocol."""

    def __init__(self, host: str, port: int, protocol: Any, transport: StringTransport) -> None:
        self.host = host
        self.port = port
        self.protocol = protocol
        self.transport = transport

    def received(self) -> bytes:
        value: bytes = self.transport.value()
        return value

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


class InMemoryProxy:
    """A proxy wired to fakes. C{config}, resolver answers and policy are tunable."""

    def __init__(
        self,
        *,
        config: RelayConfig | None = None,
        answers: dict[str, list[str]] | None = None,
        allow_cidrs: Sequence[str] = ("127.0.0.0/8",),
        base_urls: Mapping[str, str] | None = None,
        provider_hosts: Mapping[str, str] | None = None,
        server: str = "lean",
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.config = config or RelayConfig()
        self.resolver = StaticResolver(answers or {})
        self.policy = TargetPolicy(
            self.resolver, allow_cidrs=allow_cidrs, provider_hosts=provider_hosts
        )
        coalescer = WriteCoalescer()
        self.pool = UpstreamPool(
            self.reactor,
            coalescer=coalescer,
            connect_timeout=self.config.connect_timeout,
            idle_timeout=self.config.pool_idle_timeout,
            max_head_bytes=self.config.max_response_head,
        )
        self.sink = ListSink()
        self.services = RelayServices(self.reactor, self.config, self.policy, self.pool, self.sink)
        self.resource = ProxyResource(
            self.services, base_urls or {"openai": "https://api.openai.com"}
        )
        self.server = server
        self.site: Any
        if server == "lean":
            self.site = ProxyServerFactory(self.resource, self.reactor, coalescer=coalescer)
        else:
            self.site = ProxySite(self.resource, reactor=self.reactor)
        self._accepted = 0

    def client(self) -> tuple[Any, StringTransport]:
        """A new client connection: (channel, transport)."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        channel.makeConnection(transport)
        return channel, transport

    def connects(self) -> int:
        """How many upstream connections the proxy has opened so far."""
        return len(self.reactor.tcpClients)

    def accept_upstream(self) -> Upstream:
        """Complete the next pending upstream connection attempt."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._accepted]
        self._accepted += 1
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return Upstream(host, port, protocol, transport)

    def fail_upstream(self, reason: Exception) -> None:
        """Make the next pending upstream connection attempt fail."""
        from twisted.python.failure import Failure

        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self._accepted]
        self._accepted += 1
        # The proxy's factories never look at the connector; the memory reactor has none to give.
        factory.clientConnectionFailed(cast(IConnector, None), Failure(reason))
