"""Streaming request bodies through twisted.web: the one place that uses its internals.

twisted.web reads a whole request body into memory or a temporary file
before a resource sees the request (RELIABILITY.md, fact 4). A proxy must
instead start the upstream request as soon as the headers are in and pass
each body chunk on as it arrives, with backpressure. Twisted has no public
hook for that, so this module:

 - reads the request line that L{HTTPChannel} keeps in C{_command},
   C{_path} and C{_version} while the body is still arriving;
 - gives the request a body receiver in place of its content file;
 - finishes a response early (before the body ended) by making the channel
   non-persistent and deaf to the rest of the body.

C{tests/proxy/test_streaming_tripwire.py} fails loudly if those internals
change. Nothing else in the project touches Twisted's private state.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.web import http, server
from zope.interface import Attribute, Interface

from llmobserve.proxy._compat import client_gone, content_file, request_line

__all__ = [
    "IStreamingResource",
    "RequestBodyReceiver",
    "StreamingRequest",
    "finish_early",
    "pause_client",
    "resume_client",
]


class RequestBodyReceiver(Protocol):
    """Takes a request body as it arrives (the relay)."""

    def body_chunk(self, data: bytes) -> None: ...

    def body_complete(self) -> None: ...

    def client_gone(self) -> None: ...


class IStreamingResource(Interface):
    """A leaf resource that wants a request at header time, body still to come."""

    streaming = Attribute("True: begin_streaming is called for requests routed here")

    def begin_streaming(request: StreamingRequest) -> RequestBodyReceiver | None:
        """Start handling C{request}; return a body receiver, or None to fall back
        to twisted.web's normal buffered handling (then C{render} is called)."""


class _ReceiverFile:
    """Stands in for C{Request.content}: passes each write to the receiver."""

    __slots__ = ("receiver",)

    def __init__(self, receiver: RequestBodyReceiver) -> None:
        self.receiver = receiver

    def write(self, data: bytes) -> None:
        self.receiver.body_chunk(data)

    def tell(self) -> int:
        return 0

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class StreamingRequest(server.Request):
    """A twisted.web request that can stream its body to a resource."""

    body_receiver: RequestBodyReceiver | None = None
    defaultContentType = None  # a proxy never invents a Content-Type
    reports_client_gone = True  # connectionLost tells the body receiver

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        resource = None
        line = request_line(channel)  # parsed, not yet handed over
        if line is None:
            self.content = content_file(length)
            return
        self.method, self.uri, self.clientproto = line
        self.site = channel.site
        self.path = self.uri.split(b"?", 1)[0]
        self.prepath = []
        segments = self.path[1:].split(b"/")
        self.postpath = (
            [unquote_to_bytes(seg) for seg in segments] if b"%" in self.path else segments
        )
        resource = self.site.getResourceFor(self)
        if IStreamingResource.providedBy(resource) and resource.streaming:
            receiver = resource.begin_streaming(self)
            if receiver is not None:
                self.body_receiver = receiver
                self.content = _ReceiverFile(receiver)
                return
        self.content = content_file(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        receiver = self.body_receiver
        if receiver is None:
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]  # http.Request is unannotated
            return
        receiver.body_complete()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # http.Request is unannotated
        receiver = self.body_receiver
        if receiver is not None:
            receiver.client_gone()


def finish_early(request: http.Request) -> None:
    """Finish C{request} while its body may still be arriving, then close.

    Used when the response ends (or the proxy answers an error) before the
    client finished sending: the connection can't be reused, since the rest
    of the body would be read as a new request.
    """
    own = getattr(request, "finish_and_close", None)
    if own is not None:
        own()  # our lean channel knows how
        return
    channel: Any = request.channel
    if channel is None:
        return
    # Ignore whatever else the client sends; the connection closes after the
    # response is written.
    channel.dataReceived = _ignore
    channel.persistent = False
    if channel.requests and channel.requests[0] is not request:
        return
    if not request.finished and not client_gone(request):
        request.finish()


def _ignore(data: bytes) -> None:
    pass


def pause_client(request: http.Request) -> None:
    """Stop reading the client's connection (request-body backpressure)."""
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        transport.pauseProducing()


def resume_client(request: http.Request) -> None:
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        transport.resumeProducing()
