"""Where the proxy and the collector listen: their C{--port} as a Twisted
server endpoint string.

A bare port number means 127.0.0.1. Every listening endpoint gets a listen
backlog of L{LISTEN_BACKLOG} unless its string names one: Twisted's default
is 50, and a burst of new connections larger than that while the reactor is
busy for a few milliseconds (a client pool opening 80 connections at once)
overflows the kernel's accept queue. An overflowed SYN is dropped, and the
client's connect stalls for the one-second SYN retransmit: a latency spike
the proxy never sees. The kernel caps the backlog at C{net.core.somaxconn}.

Importing this module must stay cheap: no Twisted.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = [
    "LISTEN_BACKLOG",
    "check_port",
    "endpoint_parts",
    "listen_endpoint",
    "listens_beyond_loopback",
]

#: Pending connections the kernel may queue before the reactor accepts them.
LISTEN_BACKLOG: Final = 1024

# Server endpoint kinds that take a backlog= argument.
_WITH_BACKLOG: Final = frozenset({"tcp", "tcp6", "ssl", "unix"})
_SPLIT: Final = re.compile(r"(?<!\\):")  # endpoint strings escape colons as \:


def endpoint_parts(description: str) -> list[str]:
    """An endpoint string's kind and arguments, split at its unescaped colons
    (C{tcp6:9000:interface=\\:\\:1} has three parts, escapes kept)."""
    return _SPLIT.split(description)


def listen_endpoint(port: str) -> str:
    """The endpoint string for C{--port}: C{9000} is
    C{tcp:9000:interface=127.0.0.1:backlog=1024}; any other endpoint string
    is kept as written, with C{backlog=1024} added when it takes one and
    names none."""
    port = port.strip()
    if port.isdigit():
        return f"tcp:{int(port)}:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    kind, *args = endpoint_parts(port)
    if kind in _WITH_BACKLOG and not any(arg.startswith("backlog=") for arg in args):
        return f"{port}:backlog={LISTEN_BACKLOG}"
    return port


#: Endpoint kinds whose first argument (or C{port=}) is a TCP port.
_TCP_KINDS: Final = frozenset({"tcp", "tcp6", "ssl"})


def check_port(description: str) -> None:
    """Raise C{ValueError} if a TCP endpoint string's port is not 0-65535.

    Twisted finds out only when it listens (C{OverflowError} in a Deferred
    nobody handles); this says so before anything starts.
    """
    kind, *args = endpoint_parts(description)
    if kind not in _TCP_KINDS:
        return
    named = [a[len("port=") :] for a in args if a.startswith("port=")]
    positional = [a for a in args if "=" not in a][:1]
    for port in named or positional:
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"port must be a number from 0 to 65535, got {port!r}")


_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def listens_beyond_loopback(description: str) -> bool:
    """True unless the endpoint string pins a loopback interface (or is a UNIX socket)."""
    kind, *args = endpoint_parts(description)
    if kind == "unix":
        return False
    for part in args:
        if part.startswith("interface="):
            iface = part[len("interface=") :].replace("\\", "")
            if iface in _LOOPBACK_NAMES:
                return False
            try:
                return not ipaddress.ip_address(iface).is_loopback
            except ValueError:
                return True
    return True
