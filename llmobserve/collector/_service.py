"""The collector service: store threads, writer, and the one listening port."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorFromThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.resource import Resource

from llmobserve._exit import cannot_listen_text
from llmobserve._loglimit import LogLimiter
from llmobserve.hostguard import HostGuard, HostGuardedSite

from ._auth import KeyGuardedResource, KeyVerifier
from ._budget import DEFAULT_MAX_PARTIAL_BYTES, PartialFrameBudget
from ._dashboard import DashboardResource
from ._http import collector_root
from ._keyapi import KeysResource
from ._link import LinkRegistry, LinkServerProtocol
from ._login import DashboardGate
from ._open import open_store
from ._port import PortSwitchFactory
from ._retain import Retention
from ._sessions import DashboardSessions
from ._thread import StoreThread
from ._writer import BatchWriter

__all__ = ["CollectorService"]


#: Requests every proxy of the collector makes on its own, once a second
#: (its budgets, rate limits and grants) or every 2 s per client key
#: (C{whoami}): not in the access log when they succeed (ten proxies wrote
#: 864,000 lines a day).
_POLLED: Final = frozenset(
    {
        (b"GET", b"/api/budgets"),
        (b"GET", b"/api/limits"),
        (b"POST", b"/api/budgets/grants"),
        (b"GET", b"/api/whoami"),
    }
)


class CollectorSite(HostGuardedSite):
    """The collector's HTTP site: the access log leaves out the proxies'
    successful polls (L{_POLLED}); a poll that failed is logged through
    C{limiter} (a proxy with a wrong key fails two or three a second, for
    as long as it runs: a few lines a minute, then a count); every other
    request is logged as before."""

    def __init__(
        self, resource: Resource, guard: HostGuard, limiter: LogLimiter | None = None
    ) -> None:
        super().__init__(resource, guard)
        self._limiter = limiter

    def log(self, request: Request) -> None:
        if (request.method, request.path) in _POLLED:
            if request.code < 400:
                return
            limiter = self._limiter
            if limiter is not None and not limiter.allow("failed polls (proxies' budget reads)"):
                return
        super().log(request)


class CollectorService(MultiService):
    """Everything one collector runs: listener, link server, HTTP, store.

    Start order: the writer and reader threads (each opens its own
    connection to the store), then the port. Stop order: the port first (no
    new connections), then the open links, then the writer drains its queue
    and commits, then the threads end, and one line says what this run did
    (L{stop_summary}).

    @param endpoint: where to listen (C{twistd}'s C{--port}).
    @param db_path: the SQLite file, or a C{postgresql://} URL.
    @param heartbeat: the link heartbeat interval, seconds.
    @param synchronous: SQLite C{synchronous} for the writer (C{FULL}:
        an ack means the events survive power loss too).
    @param host_guard: the C{Host} check every HTTP request passes before
        it is routed (default: IP literals and localhost only).
    @param max_partial_bytes: bytes all links together may hold for frames
        not yet complete (L{PartialFrameBudget}).
    @param require_keys: links need an C{ingest} key in their hello, and
        C{/api/*} an C{Authorization: Bearer} key or a dashboard session,
        and C{/dashboard} a login with a read key (the C{twistd} plugin sets
        it when listening beyond loopback).
    @param retain: delete events older than this many seconds (L{Retention}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamServerEndpoint,
        db_path: Path | str,
        heartbeat: float = 10.0,
        synchronous: str = "FULL",
        scheme: str = "http",
        host_guard: HostGuard | None = None,
        max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES,
        on_listen_failure: Callable[[], None] | None = None,
        require_keys: bool = False,
        retain: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._reactor: IReactorTime = reactor
        self._endpoint = endpoint
        #: C{https} when the endpoint speaks TLS (an C{ssl:} port), for the start-up line.
        self.scheme = scheme
        self.db_path = db_path
        threads: IReactorFromThreads = reactor
        # the schema was created or migrated at start-up (makeService)
        self.writer_thread = StoreThread(
            threads,
            lambda: open_store(
                db_path, synchronous=synchronous, log=self._store_said, migrate=False
            ),
            "llmobserve-store-writer",
        )
        self.reader_thread = StoreThread(
            threads, lambda: open_store(db_path, migrate=False), "llmobserve-store-reader"
        )
        self.writer_thread.setServiceParent(self)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self.reader_thread.setServiceParent(self)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self.limiter = LogLimiter(reactor)
        self.writer = BatchWriter(self.writer_thread, self.limiter)
        self.verifier = KeyVerifier(self.reader_thread, reactor) if require_keys else None
        self.retention: Retention | None = None
        if retain is not None:
            self.retention = Retention(reactor, self.writer_thread, self.writer, retain)
            self.retention.setServiceParent(self)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self.links = LinkRegistry(
            PartialFrameBudget(max_partial_bytes), self.limiter, self.verifier
        )
        root = collector_root(self.reader_thread, self.writer, self.links)
        #: the dashboard's logins (None when keys are not required)
        self.sessions = DashboardSessions(reactor) if require_keys else None
        if self.verifier is not None and self.sessions is not None:
            _guard(root, self.reader_thread, self.verifier, self.sessions)
        self.site = CollectorSite(root, host_guard or HostGuard(), self.limiter)
        self.site.noisy = False
        self.factory = PortSwitchFactory(self._make_link, self.site, self._reactor)
        self._heartbeat = heartbeat
        self._on_listen_failure = on_listen_failure
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()
        self._started_at: float | None = None

    @property
    def require_keys(self) -> bool:
        """Whether links and the API need keys."""
        return self.verifier is not None

    def _store_said(self, line: str) -> None:
        """A line from the store's thread (PostgreSQL connection loss and recovery)."""
        self.log.warn("{line}", line=line)

    def _make_link(self) -> LinkServerProtocol:
        return LinkServerProtocol(self.writer, self._reactor, self.links, self._heartbeat)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self._started_at = self._reactor.seconds()
        # The writer thread's first job: count what is already stored, so
        # /health is exact from then on (it runs before any insert). Listen
        # only after it: "listening" then means the store is open and ready.
        d = self.writer_thread.submit(lambda store: store.count())
        d.addCallback(self._counted)
        d.addCallback(lambda _: self._endpoint.listen(self.factory))
        d.addCallbacks(self._bound, self._not_bound)

    def _counted(self, n: int) -> None:
        self.writer.stored += n

    def _bound(self, port: IListeningPort) -> None:
        if not self.running:  # stopped before the store was ready
            port.stopListening()
            return
        self.port = port
        host = port.getHost()
        h = getattr(host, "host", "?")
        if ":" in h:
            h = f"[{h}]"
        self.log.info(
            "llmobserve collector listening on {scheme}://{host}:{port}{keys}",
            scheme=self.scheme,
            host=h,
            port=getattr(host, "port", "?"),
            keys="; keys required (links: an ingest key; /api and /dashboard: a key of the"
            " scope each route needs)"
            if self.verifier is not None
            else "",
        )
        self.listening.callback(port)

    def _not_bound(self, failure: Failure) -> None:
        if failure.check(CannotListenError, OSError):
            self.log.critical(
                "llmobserve collector cannot listen on {where}; stopping",
                where=cannot_listen_text(failure),
            )
        else:
            self.log.failure("llmobserve collector cannot start", failure)
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)  # said above
        if self._on_listen_failure is not None:
            self._on_listen_failure()
            return
        reactor: Any = self._reactor
        if getattr(reactor, "running", False):
            reactor.stop()

    def stopService(self) -> Deferred[None]:
        """Stop listening, close the links, drain the writer, end the threads."""
        # Not MultiService.stopService: that stops every child at once.
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.retention is not None:
            self.retention.stopService()
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
        for link in list(self.links.links):
            if link.transport is not None:
                link.transport.loseConnection()
        while not self.writer.idle():
            await deferLater(self._reactor, 0.01, lambda: None)
        await DeferredList([self.reader_thread.stopService(), self.writer_thread.stopService()])
        self.limiter.stop()
        self.log.info("{summary}", summary=self.stop_summary())

    def stop_summary(self) -> str:
        """The shutdown line: what this run stored, ignored and served, and for how long."""
        w = self.writer
        started = self._started_at
        uptime = 0.0 if started is None else self._reactor.seconds() - started
        rejected = f", {_count(w.rejected, 'event')} stored as rejected" if w.rejected else ""
        return (
            f"llmobserve collector stopped: {_count(w.inserted, 'event')} stored, "
            f"{_count(w.duplicates, 'duplicate')} ignored{rejected}, "
            f"{_count(self.links.served, 'link')} served; up {duration_text(uptime)}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def duration_text(seconds: float) -> str:
    """C{42 s}, C{5 min 12 s}, C{3 h 4 min}, C{2 d 3 h}: two units at most."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _guard(
    root: Resource, reader: StoreThread, verifier: KeyVerifier, sessions: DashboardSessions
) -> None:
    """Put C{/api} (with C{/api/keys}, admin only) behind keys, and
    C{/dashboard} behind its login (a read key's session reads, through
    C{/api}, its project only)."""
    api = root.children[b"api"]
    api.putChild(b"keys", KeysResource(reader, verifier))
    guarded = KeyGuardedResource(api, verifier, admin_paths=frozenset({b"keys"}), sessions=sessions)
    root.putChild(b"api", guarded)
    if b"dashboard" in root.children:
        page = DashboardResource(with_logout=True)
        root.putChild(b"dashboard", DashboardGate(page, verifier, sessions))
