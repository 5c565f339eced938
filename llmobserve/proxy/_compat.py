"""Every private Twisted name the project touches, in one place.

Twisted may rename or drop any of these in a release without notice. Each
is read here and nowhere else, and each has a tripwire in
C{tests/proxy/test_compat.py} that names the attribute when an upgrade
removes it. The pin in C{pyproject.toml} is the Twisted these were checked
against.

Name by name:

  - C{EPollReactor._poller}, C{._selectables}, C{._doReadOrWrite}: the lean
    poll step (L{epoll_internals}, used by C{_poll.py}).
  - C{tcp.Connection._tempDataLen}, C{.dataBuffer}, C{.offset}, C{.socket}:
    the write-through of L{write_now} (nothing queued: send at once).
  - C{http.Request._disconnected}: whether a twisted.web request's client
    went away (L{client_gone}; the lean C{ChannelRequest} keeps the same
    flag under the same name).
  - C{HTTPChannel._command}, C{._path}, C{._version} and
    C{http._getContentFile}: C{StreamingRequest} routes a request before its
    body arrives (L{request_line}, L{content_file}).
  - C{twisted.internet._sslverify.IOpenSSLTrustRoot}: the trust-root
    interface C{optionsForClientTLS} takes, not re-exported by
    C{twisted.internet.ssl}.
  - C{ReactorBase._exitSignal}: twistd re-raises the stopping signal after
    the reactor stops; a drained stop clears it (L{clear_exit_signal}).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet import tcp
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.web import http

__all__ = [
    "EpollInternals",
    "IOpenSSLTrustRoot",
    "clear_exit_signal",
    "client_gone",
    "content_file",
    "epoll_internals",
    "request_line",
    "write_now",
]

_TCP = (tcp.Server, tcp.Client)


class EpollInternals(NamedTuple):
    """What the lean poll step reads of an C{EPollReactor}, fetched once."""

    poller: Any  # select.epoll
    selectables: dict[int, Any]  # fd -> selectable; the reactor's own dict, updated in place
    do_read_or_write: Any  # (selectable, fd, event) -> None


def epoll_internals(reactor: Any) -> EpollInternals | None:
    """C{reactor}'s epoll object, its fd map and its dispatch; None if it lacks one."""
    try:
        return EpollInternals(reactor._poller, reactor._selectables, reactor._doReadOrWrite)
    except AttributeError:
        return None


def write_now(transport: Any, data: bytes) -> None:
    """Send C{data} now if the transport has nothing queued, else queue it.

    Only a plain TCP transport is written through (its socket, and the
    buffer fields that say nothing is queued); any other transport (TLS,
    test transports) takes C{transport.write}.
    """
    if (
        type(transport) in _TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and len(transport.dataBuffer) == transport.offset
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write path will meet the error and close
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


def client_gone(request: Any) -> bool:
    """True once C{request}'s client connection was lost."""
    gone: bool = request._disconnected
    return gone


def request_line(channel: Any) -> tuple[bytes, bytes, bytes] | None:
    """The method, target and version an C{HTTPChannel} has parsed for the
    request whose headers it is reading; None for another kind of channel."""
    try:
        return channel._command, channel._path, channel._version
    except AttributeError:
        return None


def content_file(length: int | None) -> Any:
    """twisted.web's own body buffer for a request of C{length} bytes."""
    return http._getContentFile(length)


def clear_exit_signal(reactor: Any, number: int) -> None:
    """Forget that signal C{number} stopped C{reactor}, so twistd exits 0."""
    if getattr(reactor, "_exitSignal", None) == number:
        reactor._exitSignal = None
