"""Tripwires: every private Twisted name in C{llmobserve/proxy/_compat.py}.

One test per name, on real Twisted objects: a Twisted upgrade that renames
or drops one fails here, naming it, before anything subtler breaks. The
last test keeps the names in that one module.
"""

from __future__ import annotations

import ast
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol, reactor, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.ssl import platformTrust
from twisted.internet.testing import StringTransport
from twisted.web import http, server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel
from zope.interface.interface import InterfaceClass

import twisted
from llmobserve.proxy import _compat

TWISTED = f"Twisted {twisted.__version__}"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def epoll_reactor() -> Iterator[Any]:
    made = EPollReactor()
    try:
        yield made
    finally:
        made.removeAll()
        made.removeReader(made.waker)
        made.waker.connectionLost(None)
        made._poller.close()


def test_epoll_reactor_poller_selectables_and_dispatch(epoll_reactor: Any) -> None:
    """C{EPollReactor._poller}, C{._selectables}, C{._doReadOrWrite} (the lean poll step)."""
    internals = _compat.epoll_internals(epoll_reactor)
    assert internals is not None, (
        f"{TWISTED}: EPollReactor lost _poller/_selectables/_doReadOrWrite"
    )
    assert callable(internals.poller.poll), f"{TWISTED}: EPollReactor._poller has no poll()"
    assert internals.selectables is epoll_reactor._selectables
    assert isinstance(internals.selectables, dict), f"{TWISTED}: _selectables is not a dict"
    assert epoll_reactor.waker.fileno() in internals.selectables
    assert callable(internals.do_read_or_write)
    assert _compat.epoll_internals(object()) is None


def test_tcp_connection_write_buffer_fields() -> None:
    """C{tcp.Connection._tempDataLen}, C{.dataBuffer}, C{.offset}, C{.socket} (write_now)."""
    a, b = socket.socketpair()
    try:
        conn = tcp.Connection(a, protocol.Protocol(), reactor)
        for name in ("socket", "dataBuffer", "offset", "_tempDataLen", "connected"):
            assert hasattr(conn, name), f"{TWISTED}: tcp.Connection lost {name}"
        assert (conn.dataBuffer, conn.offset, conn._tempDataLen) == (b"", 0, 0)
        assert issubclass(tcp.Server, tcp.Connection) and issubclass(tcp.Client, tcp.Connection)
    finally:
        a.close()
        b.close()


def test_web_request_disconnected_flag() -> None:
    """C{http.Request._disconnected}: False while the client is there, True once it left."""
    request = http.Request(DummyChannel())  # type: ignore[arg-type]  # twisted.web's test double for an HTTPChannel
    assert _compat.client_gone(request) is False, f"{TWISTED}: Request._disconnected"
    request.connectionLost(Exception("gone"))
    assert _compat.client_gone(request) is True, f"{TWISTED}: Request._disconnected not set"


def test_http_channel_request_line_before_the_body() -> None:
    """C{HTTPChannel._command}, C{._path}, C{._version} are set when C{gotLength} runs."""
    seen: list[Any] = []

    class Probe(server.Request):
        def gotLength(self, length: int | None) -> None:
            seen.append(_compat.request_line(self.channel))
            super().gotLength(length)  # type: ignore[no-untyped-call]  # twisted.web.http is unannotated

    site = server.Site(Resource())
    site.requestFactory = Probe
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /x?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    assert seen == [(b"POST", b"/x?q=1", b"HTTP/1.1")], f"{TWISTED}: HTTPChannel request line"
    assert _compat.request_line(object()) is None


def test_web_content_file() -> None:
    """C{http._getContentFile}: a writable, seekable body buffer of any size."""
    for length in (None, 10, 10**9):
        body = _compat.content_file(length)
        body.write(b"abc")
        body.seek(0)
        assert body.read() == b"abc", f"{TWISTED}: http._getContentFile({length})"
        body.close()


def test_sslverify_trust_root_interface() -> None:
    """C{twisted.internet._sslverify.IOpenSSLTrustRoot}, which C{platformTrust()} provides."""
    assert isinstance(_compat.IOpenSSLTrustRoot, InterfaceClass)
    assert _compat.IOpenSSLTrustRoot.providedBy(platformTrust()), f"{TWISTED}: IOpenSSLTrustRoot"


def test_reactor_exit_signal() -> None:
    """C{ReactorBase._exitSignal}: what twistd re-raises; a drained stop clears SIGTERM only."""
    assert hasattr(reactor, "_exitSignal"), f"{TWISTED}: ReactorBase lost _exitSignal"

    class Stopped:
        _exitSignal: int | None = signal.SIGINT

    stopped = Stopped()
    _compat.clear_exit_signal(stopped, signal.SIGTERM)
    assert stopped._exitSignal == signal.SIGINT
    stopped._exitSignal = signal.SIGTERM
    _compat.clear_exit_signal(stopped, signal.SIGTERM)
    assert stopped._exitSignal is None


#: Each private Twisted name, and the module of ours that may also use it as
#: its own (the lean channel's request keeps twisted.web's flag name).
_NAMES = {
    "_poller": (),
    "_selectables": (),
    "_doReadOrWrite": (),
    "_tempDataLen": (),
    "_getContentFile": (),
    "_command": (),
    "_path": (),
    "_version": (),
    "_exitSignal": (),
    "_sslverify": (),
    "_disconnected": ("llmobserve/proxy/_channel.py",),
}


def test_only_the_compat_module_reads_them() -> None:
    """No other module of the project reads one of those names on a foreign object."""
    found = []
    for path in sorted((ROOT / "llmobserve").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where == "llmobserve/proxy/_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if isinstance(node, ast.Attribute):
                name, owner = node.attr, node.value
                if isinstance(owner, ast.Name) and owner.id == "self":
                    continue  # our own attribute of that name
            elif isinstance(node, ast.ImportFrom):
                name = (node.module or "").rsplit(".", 1)[-1]
            else:
                continue
            if name in _NAMES and where not in _NAMES[name]:
                found.append(f"{where}:{node.lineno} {name}")
    assert found == []
