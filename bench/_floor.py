"""The floor of any Twisted relay, for the overhead benchmark (its own process).

Stock C{twisted.protocols.portforward} on 127.0.0.1, relaying every
connection to one upstream port: bytes only, no HTTP parsing, one upstream
connection per client connection, the default reactor.  No Twisted relay
can do less per request, so C{bench.overhead} states the proxy's figures
as ratios to this one's, measured in the same run with the same pins.
Prints C{PORT <n>} on stdout once listening; exits on SIGTERM or EOF on
stdin.

    python -m bench._floor --upstream-port N
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorCore, IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.protocols.portforward import ProxyFactory
from twisted.python.failure import Failure


class _StopOnEOF(Protocol):
    """Stops the reactor when stdin closes (the benchmark's way out)."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        core: IReactorCore = reactor
        if core.running:
            core.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._floor")
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    tcp: IReactorTCP = reactor
    factory = ProxyFactory("127.0.0.1", args.upstream_port)
    # the same listen backlog as the proxy's (llmobserve/endpoints.py)
    port = tcp.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[arg-type]  # portforward is untyped
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    StandardIO(_StopOnEOF())
    sys.stdout.write(f"PORT {address.port}\n")
    sys.stdout.flush()
    core: IReactorCore = reactor
    core.run()


if __name__ == "__main__":
    main()
