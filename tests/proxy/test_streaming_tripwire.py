"""Tripwire: the twisted.web internals that request-body streaming relies on.

llmobserve/proxy/_streaming.py is the only module that touches them. If a
Twisted release changes any of these, this file fails first and says which.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.web import http, server
from twisted.web.resource import Resource

from llmobserve.proxy._streaming import StreamingRequest


class _Recorder:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.complete = False

    def body_chunk(self, data: bytes) -> None:
        self.chunks.append(data)

    def body_complete(self) -> None:
        self.complete = True

    def client_gone(self) -> None:
        pass


def _channel(request_factory: Any) -> tuple[http.HTTPChannel, StringTransport]:
    site = server.Site(Resource())
    site.requestFactory = request_factory
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_channel_keeps_the_request_line_while_the_body_arrives() -> None:
    """HTTPChannel stores _command, _path and _version before calling gotLength."""
    seen: dict[str, Any] = {}

    class Probe(http.Request):
        def gotLength(self, length: int | None) -> None:
            seen["line"] = (
                self.channel._command,
                self.channel._path,
                self.channel._version,
            )
            seen["length"] = length
            super().gotLength(length)  # type: ignore[no-untyped-call]  # http.Request is unannotated

    channel, _ = _channel(Probe)
    channel.dataReceived(b"POST /proxy?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
    assert seen == {"line": (b"POST", b"/proxy?x=1", b"HTTP/1.1"), "length": 4}


def test_body_chunks_reach_request_content_write_before_the_end() -> None:
    """handleContentChunk writes each chunk to request.content as it arrives."""
    recorder = _Recorder()

    class Probe(StreamingRequest):
        def gotLength(self, length: int | None) -> None:
            from llmobserve.proxy._streaming import _ReceiverFile

            self.body_receiver = recorder
            self.content = _ReceiverFile(recorder)

    channel, _ = _channel(Probe)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    assert recorder.chunks == [b"abc"]
    assert not recorder.complete
    channel.dataReceived(b"def")
    assert recorder.chunks == [b"abc", b"def"]
    assert recorder.complete, "requestReceived ends the body"


def test_chunked_bodies_stream_too() -> None:
    recorder = _Recorder()

    class Probe(StreamingRequest):
        def gotLength(self, length: int | None) -> None:
            from llmobserve.proxy._streaming import _ReceiverFile

            assert length is None
            self.body_receiver = recorder
            self.content = _ReceiverFile(recorder)

    channel, _ = _channel(Probe)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    assert recorder.chunks == [b"abc"]
    channel.dataReceived(b"0\r\n\r\n")
    assert recorder.complete


def test_non_persistent_channel_closes_after_an_early_finish() -> None:
    """finish_early relies on persistent=False making requestDone close the connection."""
    from llmobserve.proxy._streaming import finish_early

    requests: list[Any] = []

    class Probe(StreamingRequest):
        def gotLength(self, length: int | None) -> None:
            from llmobserve.proxy._streaming import _ReceiverFile

            self.body_receiver = _Recorder()
            self.content = _ReceiverFile(self.body_receiver)
            self.method, self.uri, self.clientproto = (
                self.channel._command,
                self.channel._path,
                self.channel._version,
            )
            requests.append(self)

    channel, transport = _channel(Probe)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
    (request,) = requests
    request.setResponseCode(413)
    request.setHeader(b"Content-Length", b"0")
    finish_early(request)
    assert transport.disconnecting
    channel.dataReceived(b"x" * 97 + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"smuggled" not in transport.value()
    assert transport.value().count(b"HTTP/1.1 ") == 1
