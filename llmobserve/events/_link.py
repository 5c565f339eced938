"""The proxy side of the collector link (docs/LINK.md).

One persistent TCP connection per proxy process, kept by a C{ClientService}
with capped, jittered backoff. After the magic and C{hello}, the proxy waits
for C{welcome}, then sends C{batch} frames of events taken from the
L{Outbox}; cumulative C{ack}s move the spool's ack point. Heartbeats notice
a half-open or black-holed collector (silent for three intervals: the link
is aborted and rebuilt, and everything unacknowledged is sent again).

The link writes with a push producer registered on the transport, so a
collector that stops reading pauses sending instead of growing a buffer;
the records stay in the outbox window and on disk.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgpack
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmobserve.events._codec import (
    MAGIC,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from llmobserve.events._outbox import Outbox, Record

__all__ = ["CollectorLink", "LinkProtocol", "batch_frame", "retry_policy"]

_LENGTH: Final = struct.Struct(">I")
_BATCH_HEAD: Final = b"\x83" + msgpack.packb("t") + msgpack.packb("batch") + msgpack.packb("seq")
_EVENTS_KEY: Final = msgpack.packb("events")
_ARRAY: Final = msgpack.Packer(use_bin_type=True)


def batch_frame(records: Sequence[Record]) -> bytes:
    """A C{batch} frame built around already-packed events (no repacking).

    The body is the msgpack map C{{"t": "batch", "seq": <last seq>,
    "events": [...]}}, byte for byte what C{encode_frame} would produce.
    """
    body = b"".join(
        [
            _BATCH_HEAD,
            msgpack.packb(records[-1][0]),
            _EVENTS_KEY,
            _ARRAY.pack_array_header(len(records)),
            *(payload for _seq, payload in records),
        ]
    )
    if len(body) > MAX_FRAME_SIZE:
        raise FrameError(f"batch of {len(body)} bytes exceeds the frame maximum")
    return _LENGTH.pack(len(body)) + body


def retry_policy(
    initial: float = 0.25,
    cap: float = 5.0,
    factor: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """Exponential backoff from Twisted's C{backoffPolicy}, capped at C{cap}
    seconds, with "equal jitter": each delay is drawn from [d/2, d].

    Twisted's own jitter adds up to a second on top of the cap, which is
    more than the whole cap in tests; ours scales with the delay instead.
    """
    base = backoffPolicy(initialDelay=initial, maxDelay=cap, factor=factor, jitter=lambda: 0.0)

    def policy(attempt: int) -> float:
        return float(base(attempt) * (0.5 + 0.5 * rng()))

    return policy


@implementer(IPushProducer)
class LinkProtocol(Protocol):
    """One link connection: handshake, batches out, acks and heartbeats in."""

    _log = Logger()

    def __init__(self, link: CollectorLink) -> None:
        self._link = link
        self._decoder = FrameDecoder()
        self.ready = False  # welcome received
        self.paused = False  # the transport's buffer is full
        self._last_heard = 0.0
        self._beat: IDelayedCall | None = None

    # -- IProtocol ----------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]  # IConsumer
        self._last_heard = self._link.clock.seconds()
        hello: dict[str, Any] = {
            "t": "hello",
            "proxy_id": self._link.proxy_id,
            "version": PROTOCOL_VERSION,
        }
        if self._link.key:
            hello["key"] = self._link.key
        self.transport.write(MAGIC + encode_frame(hello))
        self._beat = self._link.clock.callLater(self._link.heartbeat_interval, self._heartbeat)
        self._link._connected(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.ready and data.startswith(b"HTTP/1."):
            # an HTTP answer to the link's hello: a collector on a TLS port
            # linked over plain TCP says so (its words, once, not a frame error)
            self._refused_in_http(data)
            return
        try:
            messages = self._decoder.feed(data)
        except FrameError as e:
            self._fail(f"protocol error from the collector: {e}")
            return
        self._last_heard = self._link.clock.seconds()
        for message in messages:
            if not self._handle(message):
                return

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
        self.ready = False
        self._link._lost(self)

    # -- IPushProducer --------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._link.pump()

    def stopProducing(self) -> None:
        self.paused = True

    # -- messages ---------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> bool:
        kind = message["t"]
        if kind == "ack":
            seq = message.get("seq")
            if not self.ready or not isinstance(seq, int) or isinstance(seq, bool):
                self._fail(f"bad ack {seq!r}")
                return False
            self._link._acked(seq)
        elif kind == "welcome":
            if message.get("version") != PROTOCOL_VERSION:
                self._fail(f"collector speaks link version {message.get('version')!r}")
                return False
            self.ready = True
            self._link._welcomed(self)
        elif kind == "error":
            reason = message.get("reason")
            self._link._refused(reason if isinstance(reason, str) else "error", message)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport
            return False
        elif kind == "ping":
            self._write({"t": "pong", "ts": message.get("ts", 0.0)})
        elif kind == "pong":
            pass  # _last_heard was updated
        else:
            self._log.debug("ignoring link message {kind!r}", kind=kind)
        return True

    def _refused_in_http(self, data: bytes) -> None:
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        try:  # the error contract's JSON, or any words
            words = str(json.loads(body)["error"]["message"])[:200]
        except (ValueError, LookupError, TypeError):
            words = body.decode("utf-8", "replace").strip()[:200]
        reason = "tls_required" if b"tls_required" in head else "http"
        self._link._refused(reason, {"message": f"it answered {status!r}: {words}"})
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport

    def _write(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(message))

    def send_batch(self, records: Sequence[Record]) -> None:
        """Write one batch frame (the caller checks L{paused} afterwards)."""
        assert self.transport is not None
        self.transport.write(batch_frame(records))

    def _heartbeat(self) -> None:
        clock = self._link.clock
        interval = self._link.heartbeat_interval
        if clock.seconds() - self._last_heard >= 3 * interval:
            self._fail(f"collector silent for {3 * interval:g}s")
            return
        self._write({"t": "ping", "ts": clock.seconds()})
        self._beat = clock.callLater(interval, self._heartbeat)

    def _fail(self, why: str) -> None:
        self._log.warn("collector link closed: {why}", why=why)
        self._link.protocol_errors += 1
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport


@implementer(ILogObserver)
def _discard(event: LogEvent) -> None:
    """A log observer that keeps nothing."""


@implementer(IProtocolFactory)
class _LinkFactory(Factory):
    noisy = False  # "Starting factory" on every retry is noise: the link logs its state

    def __init__(self, link: CollectorLink) -> None:
        self._link = link

    def buildProtocol(self, addr: IAddress | None) -> LinkProtocol:
        return LinkProtocol(self._link)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Tells the link about every connection attempt and its failure."""

    def __init__(self, endpoint: IStreamClientEndpoint, link: CollectorLink) -> None:
        self._endpoint = endpoint
        self._link = link

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self._link._attempt(_next_url(self._endpoint))
        d = self._endpoint.connect(protocolFactory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> Failure:
        self._link._attempt_failed(failure)
        return failure


def _next_url(endpoint: IStreamClientEndpoint) -> str | None:
    """The collector URL an endpoint that rotates over several collectors
    tries next (its C{current_url}, see C{llmobserve.proxy._rotate}); None
    for an endpoint to one collector."""
    url = getattr(endpoint, "current_url", None)
    return url if isinstance(url, str) else None


class _QuietClientService(ClientService):
    """A C{ClientService} that does not log "Scheduling retry N to connect ...
    in 2.60214569528289 seconds" on every attempt (the link's own lines say
    when it goes down and comes back)."""

    _log = Logger(observer=_discard)


class CollectorLink(Service):
    """Keeps one link to the collector and feeds it from the outbox.

    @ivar state: C{connecting} (no outcome yet, or handshake under way),
        C{connected} (welcome received) or C{down} (the last attempt failed
        or the link was lost; a retry is scheduled).
    @ivar reconnects: connection attempts after the first.

    The log says when the link goes down (once), when it comes back (once),
    and every C{summary_interval} seconds in between how long it has been
    down: never a line per retry.

    @ivar refused: why the collector last refused this link (its C{error}
        frame's reason, e.g. C{unauthorized}), None once welcomed.
    @ivar url: the collector in use: the one connected to, or else the one
        the latest attempt went to (C{--collector} repeated: they are tried
        in turn, so this moves after a failover).
    @ivar urls: every collector the link may use, in the order given.
    """

    _log = Logger()

    #: The link sends the spooled payloads as they are: the parse threads
    #: make no store rows ahead for it (compare L{EmbeddedWriter.row_for}).
    row_for: Callable[[Any], Any] | None = None

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        outbox: Outbox,
        *,
        proxy_id: str,
        url: str,
        urls: Sequence[str] = (),
        heartbeat_interval: float = 5.0,
        retry: Callable[[int], float] | None = None,
        max_batch_records: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        summary_interval: float = 300.0,
        key: str | None = None,
    ) -> None:
        self.clock = clock
        #: the link key sent in the hello (C{--collector-key}); never logged
        self.key = key
        self.refused: str | None = None
        self.outbox = outbox
        self.proxy_id = proxy_id
        self.url = url
        self.urls: list[str] = list(urls) or [url]
        self.heartbeat_interval = heartbeat_interval
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.state = "connecting"
        self.attempts = 0
        self.protocol_errors = 0
        self.summary_interval = summary_interval
        self._down_since: float | None = None  # when the outage began (clock seconds)
        self._failed_since_up = 0
        self._summarised_at = 0.0
        self._proto: LinkProtocol | None = None
        self._pumping = False
        self._again = False
        outbox.on_ready = self.pump
        self._service = _QuietClientService(
            _WatchedEndpoint(endpoint, self),
            _LinkFactory(self),
            retryPolicy=retry or retry_policy(),
            clock=clock,
        )

    def hold_row(self, seq: int, row: Any) -> None:
        """Nothing to hold: see L{row_for}."""

    @property
    def reconnects(self) -> int:
        return max(0, self.attempts - 1)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        d: Deferred[None] = self._service.stopService()

        def stopped(result: None) -> None:
            self.state = "down"

        return d.addCallback(stopped)

    # -- called by the protocol and the endpoint -----------------------------

    def _attempt(self, url: str | None = None) -> None:
        self.attempts += 1
        if url is not None:
            self.url = url
        if self.state != "down":
            self.state = "connecting"

    def _attempt_failed(self, failure: Failure) -> None:
        self.state = "down"
        self._failed_since_up += 1
        if self._down_since is None:
            self._went_down(f"unreachable ({failure.getErrorMessage()})")
        elif self.clock.seconds() - self._summarised_at >= self.summary_interval:
            self._still_down()

    def _went_down(self, why: str) -> None:
        self._down_since = self._summarised_at = self.clock.seconds()
        self._log.warn(
            "collector link down: {url} {why}; events wait in the spool, retrying quietly",
            url=self.url,
            why=why,
        )

    def _still_down(self) -> None:
        assert self._down_since is not None
        self._summarised_at = now = self.clock.seconds()
        self._log.warn(
            "collector link still down: {url} for {minutes:.0f} min, {attempts} attempts; "
            "{waiting} events waiting",
            url=self.url,
            minutes=(now - self._down_since) / 60,
            attempts=self._failed_since_up,
            waiting=self.outbox.waiting,
        )

    def _connected(self, proto: LinkProtocol) -> None:
        self._proto = proto
        self.state = "connecting"

    def _welcomed(self, proto: LinkProtocol) -> None:
        if proto is not self._proto:
            return
        self.state = "connected"
        self.refused = None
        self.outbox.rewind()
        if self._down_since is None:
            self._log.info("collector link up: {url}", url=self.url)
        else:
            self._log.info(
                "collector link up: {url} (back after {seconds:.0f} s down, {attempts} attempts)",
                url=self.url,
                seconds=self.clock.seconds() - self._down_since,
                attempts=self._failed_since_up,
            )
        self._down_since = None
        self._failed_since_up = 0
        self.pump()

    def _refused(self, reason: str, message: dict[str, Any]) -> None:
        # Every event stays spooled; the service keeps retrying, so a key
        # created or fixed on the collector is picked up without a restart.
        if reason != self.refused:
            text = message.get("message")
            self._log.warn(
                "collector {url} refused the link ({reason}): {why}",
                url=self.url,
                reason=reason,
                why=text if isinstance(text, str) else "",
            )
        self.refused = reason
        self.state = "down"

    def _acked(self, seq: int) -> None:
        self.outbox.ack(seq)

    def _lost(self, proto: LinkProtocol) -> None:
        if proto is not self._proto:
            return
        if self._down_since is None:
            self._went_down("lost" if self.state == "connected" else "closed in the handshake")
        self._proto = None
        self.state = "down"
        self.outbox.rewind()

    # -- sending ----------------------------------------------------------------

    def pump(self) -> None:
        """Send what is ready now (callers pump once per burst of events)."""
        if not self.running:
            return
        if self._pumping:  # re-entered (a synchronous read landed): go round again
            self._again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._again = False
                proto = self._proto
                while proto is not None and proto.ready and not proto.paused:
                    records = self.outbox.take(self.max_batch_records, self.max_batch_bytes)
                    if not records:
                        break
                    proto.send_batch(records)
                again = self._again
        finally:
            self._pumping = False

    @property
    def connected(self) -> bool:
        return self.state == "connected"
