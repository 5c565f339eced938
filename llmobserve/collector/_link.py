"""The collector's side of the link (docs/LINK.md).

A L{LinkServerProtocol} takes over a connection after the port switch has
seen the magic. It waits for C{hello}, answers C{welcome}, hands each
C{batch} to the L{BatchWriter} and sends the cumulative C{ack} only when the
writer says the batch is committed. Any protocol error closes this link only;
the proxy reconnects and resends, and deduplication on C{id} makes that safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmobserve._loglimit import LogLimiter
from llmobserve.events import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    encode_frame,
)

from ._auth import KeyVerifier, refusal_message
from ._budget import PartialFrameBudget
from ._keys import Verdict
from ._writer import BatchWriter

__all__ = ["LinkRegistry", "LinkServerProtocol"]


class StreamTransport(TypingProtocol):
    """What the link needs of its transport (a TCP connection provides it)."""

    def write(self, data: bytes) -> None: ...
    def abortConnection(self) -> None: ...
    def loseConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def getPeer(self) -> IAddress: ...


SERVER_NAME = "llmobserve-collector"


class LinkRegistry:
    """The links currently open, for C{/health}, and what they share.

    @param budget: the bytes all links may hold for incomplete frames.
    @param limiter: collapses repeated log lines of all links together.
    @param verifier: when given, a link needs an C{ingest} (or C{admin}) key
        in its C{hello}; None admits every link (loopback without
        C{--require-keys}).
    """

    def __init__(
        self,
        budget: PartialFrameBudget | None = None,
        limiter: LogLimiter | None = None,
        verifier: KeyVerifier | None = None,
    ) -> None:
        self.links: set[LinkServerProtocol] = set()
        self.protocol_errors = 0
        self.budget = PartialFrameBudget() if budget is None else budget
        self.limiter = limiter
        self.verifier = verifier
        #: links refused or closed for their key
        self.unauthorized = 0
        #: links welcomed since start-up (the stop line's "links served")
        self.served = 0

    def describe(self) -> list[dict[str, Any]]:
        """One map per open link: proxy id, peer, last ack, events received."""
        return sorted(
            (link.describe() for link in self.links), key=lambda d: str(d.get("proxy_id"))
        )


class LinkServerProtocol(Protocol):
    """One proxy's link, from the byte after the magic.

    @param writer: where batches go; its Deferreds say when to ack.
    @param clock: for the hello deadline and the heartbeat.
    @param registry: the open links, for C{/health}.
    @param heartbeat: seconds between heartbeats; a link silent for three of
        them is closed (a half-open connection), and so is one that sends no
        C{hello} within one.
    @param max_unacked: events accepted but not yet committed above which
        this link stops reading (backpressure) until commits catch up.
    """

    log = Logger()

    def __init__(
        self,
        writer: BatchWriter,
        clock: IReactorTime,
        registry: LinkRegistry,
        heartbeat: float = 10.0,
        max_unacked: int = 100_000,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self._writer = writer
        self._clock = clock
        self._registry = registry
        self._heartbeat = heartbeat
        self._max_unacked = max_unacked
        self._decoder = FrameDecoder(max_frame_size)
        self._proxy_id: str | None = None
        self._hello_seen = False
        self._key: str | None = None
        self._project: str | None = None
        self._admin = False
        self._open = False
        self._paused = False
        self._unacked = 0
        self._received = 0
        self._last_ack: int | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._timer: IDelayedCall | None = None

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        self._open = True
        self._last_rx = self._last_tx = self._clock.seconds()
        self._registry.links.add(self)
        self._timer = self._clock.callLater(self._heartbeat, self._tick)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open = False
        self._registry.links.discard(self)
        self._registry.budget.release(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def describe(self) -> dict[str, Any]:
        """This link's state, for C{/health}."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return {
            "proxy_id": self._proxy_id,
            "peer": host_port(peer) if peer is not None else None,
            "acked_seq": self._last_ack,
            "events_received": self._received,
            "events_unacked": self._unacked,
        }

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_rx = self._clock.seconds()
        try:
            messages = self._decoder.feed(data)
            refused = self._registry.budget.hold(
                self, self._decoder.buffered, self._proxy_id is not None
            )
            if refused is not None:
                self._refuse(refused)
                return
            for message in messages:
                if not self._open:
                    return
                self._dispatch(message)
        except FrameError as e:
            self._protocol_error(str(e))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "batch":
            self._batch(message)
        elif kind == "hello":
            self._hello(message)
        elif kind == "ping":
            self._send({"t": "pong", "ts": message.get("ts", self._clock.seconds())})
        elif kind == "pong":
            pass
        else:
            # Newer peers may send more kinds; ignoring them keeps the link up.
            self.log.debug("link: ignoring unknown message {kind!r}", kind=kind)

    def _hello(self, message: Mapping[str, Any]) -> None:
        if self._hello_seen:
            raise FrameError("a second hello on one link")
        self._hello_seen = True
        proxy_id = message.get("proxy_id")
        version = message.get("version")
        if not isinstance(proxy_id, str) or not proxy_id:
            raise FrameError("hello without a string proxy_id")
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise FrameError(f"hello with unsupported version {version!r}")
        verifier = self._registry.verifier
        if verifier is None:
            self._welcome(proxy_id)
            return
        key = message.get("key")
        self._key = key if isinstance(key, str) else None
        d = verifier.check(self._key)
        d.addCallback(self._hello_verdict, proxy_id)

    def _hello_verdict(self, verdict: Verdict, proxy_id: str) -> None:
        if not self._open:
            return
        if not verdict.allows("ingest"):
            self._unauthorized(verdict, proxy_id)
            return
        self._project = verdict.project
        self._admin = verdict.scope == "admin"
        self._welcome(proxy_id)

    def _recheck(self, verdict: Verdict) -> None:
        if self._open and not verdict.allows("ingest"):
            self._unauthorized(verdict, self._proxy_id)

    def _unauthorized(self, verdict: Verdict, proxy_id: str | None) -> None:
        # An error frame says why (never with the key), then the link
        # closes; the proxy keeps every event spooled and retries.
        why = refusal_message(verdict, "ingest")
        self._registry.unauthorized += 1
        if self._allow("links refused for their key"):
            self.log.warn(
                "link from {proxy_id} ({peer}): unauthorized, closing: {why}",
                proxy_id=proxy_id,
                peer=self._peer(),
                why=why,
            )
        # a key store it could not read is not a bad key: the proxy's /health
        # blames its key only for "unauthorized"
        reason = "key_check_unavailable" if verdict.reason == "unavailable" else "unauthorized"
        self._send({"t": "error", "reason": reason, "message": why})
        self._open = False
        self._registry.links.discard(self)
        self._registry.budget.release(self)
        transport = self._transport()
        if transport is not None:
            transport.loseConnection()

    def _welcome(self, proxy_id: str) -> None:
        self._proxy_id = proxy_id
        self._registry.served += 1
        self._send({"t": "welcome", "version": PROTOCOL_VERSION, "server": SERVER_NAME})
        self.log.info("link from {proxy_id} ({peer}) open", proxy_id=proxy_id, peer=self._peer())

    def _batch(self, message: Mapping[str, Any]) -> None:
        if self._proxy_id is None:
            raise FrameError("batch before hello")
        verifier = self._registry.verifier
        if verifier is not None and verifier.cached(self._key) is None:
            # the verdict is older than its time to live: ask again, and
            # close this link at once if the key was revoked meanwhile
            verifier.check(self._key).addCallback(self._recheck)
        seq = message.get("seq")
        events = message.get("events")
        if type(seq) is not int or not 0 <= seq < 2**63:
            raise FrameError(f"batch with a bad seq {seq!r}")
        if not isinstance(events, list):
            raise FrameError("batch without an events list")
        good = [e for e in events if isinstance(e, dict)]
        if len(good) != len(events):
            # A non-map can never be stored, so resending it would not help:
            # drop it loudly and ack the rest.
            if self._allow("batch items that are not maps"):
                self.log.warn(
                    "link from {proxy_id}: dropped {n} events that are not maps",
                    proxy_id=self._proxy_id,
                    n=len(events) - len(good),
                )
        if self._project is not None:
            # a project's key writes that project's events; an admin key
            # (a proxy serving several projects) keeps what its events say
            for event in good:
                if not self._admin or "project" not in event:
                    event["project"] = self._project
        n = len(good)
        self._received += n
        self._unacked += n
        d = self._writer.write(good, self._proxy_id, seq)
        d.addCallbacks(
            self._committed, self._not_committed, callbackArgs=(seq, n), errbackArgs=(n,)
        )
        transport = self._transport()
        if self._unacked > self._max_unacked and not self._paused and transport is not None:
            self._paused = True
            transport.pauseProducing()

    # -- results from the writer ---------------------------------------------

    def _committed(self, _: None, seq: int, n: int) -> None:
        self._unacked -= n
        self._last_ack = seq
        if not self._open:
            return
        self._send({"t": "ack", "seq": seq})
        if self._paused and self._unacked <= self._max_unacked // 2:
            self._paused = False
            transport = self._transport()
            if transport is not None:
                transport.resumeProducing()

    def _not_committed(self, failure: Failure, n: int) -> None:
        # The writer logged why. Without a commit there is no ack; closing
        # the link makes the proxy resend once the store works again.
        self._unacked -= n
        transport = self._transport()
        if self._open and transport is not None:
            transport.abortConnection()

    # -- output and timers ----------------------------------------------------

    def _transport(self) -> StreamTransport | None:
        return cast(StreamTransport | None, self.transport)

    def _send(self, message: Mapping[str, Any]) -> None:
        if self.transport is None:
            return
        self.transport.write(encode_frame(message))
        self._last_tx = self._clock.seconds()

    def _tick(self) -> None:
        self._timer = None
        if not self._open:
            return
        now = self._clock.seconds()
        if self._proxy_id is None:
            self._protocol_error(f"no hello within {self._heartbeat:g} s")
            return
        if now - self._last_rx >= 3 * self._heartbeat:
            self.log.info(
                "link from {proxy_id}: silent for {s:.0f} s, closing",
                proxy_id=self._proxy_id,
                s=now - self._last_rx,
            )
            self._close()
            return
        if now - self._last_tx >= self._heartbeat:
            self._send({"t": "ping", "ts": now})
        self._timer = self._clock.callLater(self._heartbeat, self._tick)

    def _protocol_error(self, why: str) -> None:
        self._registry.protocol_errors += 1
        if self._allow("link protocol errors"):
            self.log.warn(
                "link from {proxy_id} ({peer}): protocol error, closing: {why}",
                proxy_id=self._proxy_id,
                peer=self._peer(),
                why=why,
            )
        self._close()

    def _refuse(self, why: str) -> None:
        # What the link held is released; the peer, if a proxy, resends.
        if self._allow("links refused for memory"):
            self.log.warn(
                "link from {proxy_id} ({peer}): refused, closing: {why}",
                proxy_id=self._proxy_id,
                peer=self._peer(),
                why=why,
            )
        self._close()

    def _allow(self, kind: str) -> bool:
        limiter = self._registry.limiter
        return limiter is None or limiter.allow(kind)

    def _close(self) -> None:
        self._open = False
        self._registry.links.discard(self)
        self._registry.budget.release(self)
        transport = self._transport()
        if transport is not None:
            transport.abortConnection()

    def _peer(self) -> str:
        return host_port(self.transport.getPeer()) if self.transport is not None else "?"


def host_port(address: Any) -> str:
    """C{127.0.0.1:54692} or C{[::1]:54692} for an IP address; other addresses as they print."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
