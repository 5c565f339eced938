"""C{twistd llmobserve}: the proxy's command-line options and service tree."""

from __future__ import annotations

import ipaddress
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from llmobserve._exit import cannot_listen_text, stop_with_status
from llmobserve._twistd import brief_usage_error, foreground_without_pidfile
from llmobserve.endpoints import check_port, endpoint_parts, listen_endpoint
from llmobserve.hostguard import HostGuard, public_name
from llmobserve.providers import UnknownProviderError, check_provider_id
from llmobserve.proxy._channel import ProxyServerFactory
from llmobserve.proxy._compat import clear_exit_signal
from llmobserve.proxy._config import DEFAULT_MAX_BODY, RelayConfig
from llmobserve.proxy._logsink import LoggingSink
from llmobserve.proxy._policy import (
    DnsServerResolver,
    OverrideResolver,
    TargetPolicy,
    TwistedResolver,
    parse_dns_server,
)
from llmobserve.proxy._relay import RelayServices
from llmobserve.proxy._resource import ProxyResource
from llmobserve.proxy._rotate import RotatingEndpoint
from llmobserve.proxy._tls import collector_endpoint, load_extra_trust, tls_creator
from llmobserve.proxy._tuning import ProcessTuning
from llmobserve.proxy._upstream import UpstreamPool
from llmobserve.proxy._workers import (
    ParentWatch,
    WorkerProcesses,
    listen_reuseport,
    tcp_address,
)
from llmobserve.proxy._writes import WriteCoalescer
from llmobserve.transaction import ITransactionSink

__all__ = ["Options", "makeService"]

_log = Logger()
_LOOPBACK_NAMES = {"127.0.0.1", "::1", "localhost"}


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


def _pair(spec: str, what: str) -> tuple[str, str]:
    left, sep, right = spec.rpartition("=")
    if not sep or not left or not right:
        raise usage.UsageError(f"{what} must look like NAME=VALUE, got {spec!r}")
    return left.strip(), right.strip()


def _provider_id(provider: str, what: str) -> str:
    try:
        return check_provider_id(provider, what)
    except UnknownProviderError as e:
        raise usage.UsageError(str(e)) from None


class Options(usage.Options):
    """Options of C{twistd llmobserve}."""

    synopsis = "[options]"
    longdesc = (
        "Run the llmobserve forwarding proxy. Clients send requests to "
        "/proxy with an X-LLMObserve-Target-URL header, or to /<provider>/... "
        "(base-URL mode, e.g. OPENAI_BASE_URL=http://127.0.0.1:9000/openai/v1). "
        "GET /health and GET /metrics describe the proxy itself."
    )

    optParameters: list[Any] = [
        [
            "port",
            "p",
            "9000",
            "Where to listen: a port number (127.0.0.1) or a Twisted endpoint string.",
        ],
        [
            "collector-ca-file",
            None,
            None,
            "PEM bundle of extra CAs to trust for an https:// collector (a private CA).",
        ],
        ["db", None, None, "Embedded store SQLite file (default $LLMOBSERVE_HOME/events.sqlite3)."],
        [
            "spool-dir",
            None,
            None,
            "Where unacknowledged events wait (default $LLMOBSERVE_HOME/spool).",
        ],
        [
            "ca-file",
            None,
            None,
            "PEM bundle of extra CAs to trust upstream (adds trust; never disables checks).",
        ],
        ["connect-timeout", None, 10.0, "Seconds to connect to an upstream.", float],
        ["header-timeout", None, 600.0, "Seconds from request sent to response headers.", float],
        ["idle-timeout", None, 300.0, "Seconds without an upstream byte mid-response.", float],
        ["client-timeout", None, 60.0, "Seconds a client connection may sit idle.", float],
        [
            "client-write-timeout",
            None,
            60.0,
            "Seconds a client may leave a response unread before both connections drop.",
            float,
        ],
        ["request-head-timeout", None, 20.0, "Seconds a client has to send a request head.", float],
        [
            "request-body-timeout",
            None,
            30.0,
            "Seconds of silence allowed inside a request body.",
            float,
        ],
        [
            "max-body",
            None,
            DEFAULT_MAX_BODY,
            "Request body limit in bytes (413 above); bodies stream, so the 2 GiB "
            "default costs no memory.",
            int,
        ],
        [
            "drain-timeout",
            None,
            10.0,
            "Seconds in-flight calls may take to finish on SIGTERM.",
            float,
        ],
        ["workers", None, 1, "Processes serving the port (SO_REUSEPORT, Linux; tcp ports).", int],
        ["worker-of", None, None, "Internal: the pid of the first process (spawned workers).", int],
    ]
    optFlags: list[Any] = [
        [
            "known-hosts-only",
            None,
            "Forward only to registry hosts, --allow-host and --provider-host "
            "(default when listening beyond loopback).",
        ],
        [
            "no-via",
            None,
            "Do not add 'Via: 1.1 llmobserve' upstream (loops are then caught by address only).",
        ],
        [
            "no-tuning",
            None,
            "Leave the process as Twisted and Python set it up: no own poll step, "
            "no malloc arena cap, no gc.freeze, no malloc_trim.",
        ],
        [
            "no-events",
            None,
            "Forward only: record no events (one log line per call). For measuring "
            "the bare forwarding path.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["allow-host"] = []
        self["allow-cidr"] = []
        self["provider-host"] = {}
        self["base-url"] = {}
        self["resolve"] = {}
        self["dns-server"] = []
        self["public-name"] = []
        self["collector"] = None
        self["collectors"] = []

    def opt_collector(self, url: str) -> None:
        """URL: collector URL (http://host:port, or https:// for a collector
        on an ssl: port); default: the embedded store. Repeatable: collectors
        sharing one PostgreSQL store, tried in turn (the next after a failed
        connection)."""
        self["collectors"].append(url)
        self["collector"] = self["collectors"][0]

    def opt_allow_host(self, host: str) -> None:
        """Admit a host name (exact, or *.suffix) even when it resolves privately. Repeatable."""
        self["allow-host"].append(host)

    def opt_allow_cidr(self, cidr: str) -> None:
        """Admit an address range (e.g. 10.0.0.0/8, 127.0.0.1/32). Repeatable."""
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--allow-cidr: {e}") from None
        self["allow-cidr"].append(cidr)

    def opt_provider_host(self, spec: str) -> None:
        """HOST[:PORT]=PROVIDER: HOST speaks PROVIDER's API; it is allowed. Repeatable."""
        host, provider = _pair(spec, "--provider-host")
        self["provider-host"][host] = _provider_id(provider, "--provider-host")

    def opt_resolve(self, spec: str) -> None:
        """HOST=ADDRESS: resolve HOST to ADDRESS (like curl); still policy-checked."""
        host, address = _pair(spec, "--resolve")
        try:
            ipaddress.ip_address(address)
        except ValueError as e:
            raise usage.UsageError(f"--resolve {host}: {e}") from None
        self["resolve"].setdefault(host.lower().rstrip("."), []).append(address)

    def opt_dns_server(self, spec: str) -> None:
        """IP[:PORT]: resolve names with this DNS server (port 53 by default),
        not the system resolver; every answer is still policy-checked.
        Repeatable (tried in turn)."""
        try:
            self["dns-server"].append(parse_dns_server(spec))
        except (ValueError, OSError) as e:
            raise usage.UsageError(f"--dns-server: {e}") from None

    def opt_public_name(self, name: str) -> None:
        """NAME: clients may reach this proxy as NAME (Host: NAME[:PORT]), e.g. a
        docker compose service or an internal DNS name; besides IP literals and
        localhost, every other Host is refused (DNS rebinding). Repeatable."""
        try:
            self["public-name"].append(public_name(name))
        except ValueError as e:
            raise usage.UsageError(f"--public-name: {e}") from None

    def opt_base_url(self, spec: str) -> None:
        """PROVIDER=URL: base-URL mode /PROVIDER/... goes to URL. Repeatable."""
        provider, url = _pair(spec, "--base-url")
        provider = _provider_id(provider, "--base-url")
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(f"--base-url {provider}: URL must be http(s)")
        self["base-url"][provider] = url

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse; under twistd a usage error is two lines on stderr and exit 2."""
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        except usage.UsageError as e:
            if self.parent is None:
                raise
            brief_usage_error("twistd llmobserve", e)

    def postOptions(self) -> None:
        foreground_without_pidfile(self.parent)
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        self["port"] = listen_endpoint(str(self["port"]))
        try:
            check_port(self["port"])
        except ValueError as e:
            raise usage.UsageError(f"--port: {e}") from None
        if (self["workers"] > 1 or self["worker-of"]) and tcp_address(self["port"]) is None:
            raise usage.UsageError("--workers needs a plain tcp port (tcp:PORT[:interface=IP])")
        if self["collector-ca-file"] is not None:
            if not str(self["collector"] or "").startswith("https://"):
                raise usage.UsageError("--collector-ca-file needs an https:// --collector")
            try:
                load_extra_trust(self["collector-ca-file"])
            except (ValueError, OSError) as e:
                raise usage.UsageError(f"--collector-ca-file: {e}") from None
        if listens_beyond_loopback(self["port"]) and not self["known-hosts-only"]:
            self["known-hosts-only"] = True
            self["known-hosts-only-forced"] = True


def _collector_endpoint(reactor: Any, options: Options) -> IStreamClientEndpoint | None:
    """The link's endpoint: None for one plain http:// collector (the
    pipeline makes it); several collectors are tried in turn."""
    urls: list[str] = options["collectors"]
    if not urls:
        return None
    ca_file = options["collector-ca-file"]
    if len(urls) == 1:
        return collector_endpoint(reactor, urls[0], ca_file=ca_file)
    from llmobserve.events import parse_collector_url

    endpoints: list[IStreamClientEndpoint] = []
    for url in urls:
        endpoint = collector_endpoint(reactor, url, ca_file=ca_file)
        if endpoint is None:
            host, port = parse_collector_url(url)
            endpoint = HostnameEndpoint(reactor, host, port, timeout=5.0)
        endpoints.append(endpoint)
    return RotatingEndpoint(endpoints)


def _make_sink(options: Options, reactor: Any) -> tuple[ITransactionSink, IService | None]:
    """The transaction sink: the event pipeline, or a log line per call with --no-events."""
    if options["no-events"]:
        return LoggingSink(reactor), None
    from llmobserve.events import make_event_sink  # the parse pipeline, not loaded by --no-events

    return make_event_sink(
        reactor,
        collector_url=options["collector"],
        db_path=options["db"],
        spool_dir=options["spool-dir"],
        endpoint=_collector_endpoint(reactor, options),
        store_factory=open_embedded_store,
    )


def open_embedded_store(path: str) -> Any:
    """The embedded store: the collector's C{EventStore} with C{synchronous=NORMAL}
    (durable against a crash of the process; see C{llmobserve.events._embedded})."""
    from llmobserve.collector import EventStore

    return EventStore(path, synchronous="NORMAL")


class EmbeddedReportApi(Service):
    """C{/api/events} and C{/api/report} over an embedded proxy's own store,
    as the collector serves them. The reader (a thread and an SQLite
    connection of its own) opens on the first request: a proxy nobody asks
    pays nothing for it."""

    def __init__(self, reactor: Any, db_path: str) -> None:
        self._reactor = reactor
        self._db_path = db_path
        self._reader: Any = None
        self._api: Any = None

    def resource(self) -> Any:
        """The C{/api} resource tree (reactor thread)."""
        if self._api is None:
            from llmobserve.collector import EventStore, StoreThread, api_branch

            db_path = self._db_path
            self._reader = StoreThread(
                self._reactor, lambda: EventStore(db_path), "llmobserve-report-reader"
            )
            self._reader.startService()
            self._api = api_branch(self._reader)
        return self._api

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        reader, self._reader, self._api = self._reader, None, None
        if reader is not None:
            stopped: Deferred[None] = reader.stopService()
            return stopped
        return None


def _report_api(sink: ITransactionSink, reactor: Any) -> EmbeddedReportApi | None:
    """The C{/api} of an embedded proxy; None when events go to a collector."""
    store_path: str | None = sink.store_path
    return None if store_path is None else EmbeddedReportApi(reactor, store_path)


class ProxyService(Service):
    """Listens, logs where, and drains in-flight calls on stop."""

    def __init__(
        self,
        reactor: Any,
        description: str,
        site: Any,
        services: RelayServices,
        policy: TargetPolicy,
        drain_timeout: float,
        *,
        reuse_port: bool = False,
        workers: WorkerProcesses | None = None,
        tuning: ProcessTuning | None = None,
        on_listen_failure: Callable[[], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._tuning = tuning if tuning is not None else ProcessTuning(enabled=False)
        self._on_listen_failure = on_listen_failure
        self._reuse_port = reuse_port
        self._workers = workers
        self._description = description
        self._site = site
        self._services = services
        self._policy = policy
        self._drain_timeout = drain_timeout
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._reuse_port:
            address = tcp_address(self._description)
            assert address is not None
            try:
                port = listen_reuseport(self._reactor, address[0], address[1], self._site)
            except OSError:
                self._failed(Failure())
                return
            self._listening(port)
            return
        endpoint = serverFromString(self._reactor, self._description)
        d = endpoint.listen(self._site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        address: Any = port.getHost()
        host = getattr(address, "host", None)
        if host is None:
            _log.info("llmobserve proxy listening on {address}", address=address)
            return
        self._policy.add_own_address(host, address.port)
        shown = f"[{host}]" if ":" in host else host
        _log.info(
            "llmobserve proxy listening on http://{host}:{port}", host=shown, port=address.port
        )
        if self._workers is not None:
            self._workers.spawn(host, address.port)
        self._tuning.after_listening()

    def _failed(self, failure: Failure) -> None:
        """One line saying why, then the process ends (it would serve nothing)."""
        _log.critical(
            "llmobserve proxy cannot listen on {where}; stopping",
            where=cannot_listen_text(failure),
        )
        if self._on_listen_failure is not None:
            self._on_listen_failure()
        elif getattr(self._reactor, "running", False):
            self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._workers is not None:
            self._workers.terminate()  # siblings drain at the same time as this process
        port, self._port = self._port, None
        stopped: Deferred[Any] = succeed(None) if port is None else port.stopListening()  # type: ignore[assignment]
        stopped.addCallback(lambda _: self._drain())
        if self._workers is not None:
            stopped.addCallback(lambda _: self._workers.ended() if self._workers else None)
        return stopped

    def _drain(self) -> Deferred[None]:
        """Wait for in-flight calls, up to the drain deadline, then close upstreams."""
        done: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + self._drain_timeout

        def poll() -> None:
            if self._services.stats["in_flight"] <= 0 or self._reactor.seconds() >= deadline:
                self._services.pool.close()
                done.callback(None)
            else:
                self._reactor.callLater(0.05, poll)

        poll()
        return done


def build_proxy(
    reactor: Any,
    options: Options,
    sink: ITransactionSink,
    api: Callable[[], Any] | None = None,
) -> tuple[Any, RelayServices, TargetPolicy]:
    """The site, shared services and policy for these options."""
    config = RelayConfig(
        connect_timeout=options["connect-timeout"],
        header_timeout=options["header-timeout"],
        idle_timeout=options["idle-timeout"],
        client_write_timeout=options["client-write-timeout"],
        max_body=options["max-body"],
        add_via=not options["no-via"],
    )
    trust = load_extra_trust(options["ca-file"]) if options["ca-file"] else None
    resolver: Any = TwistedResolver(reactor)
    if options["dns-server"]:
        resolver = DnsServerResolver(reactor, options["dns-server"])
    if options["resolve"]:
        resolver = OverrideResolver(options["resolve"], resolver)
    policy = TargetPolicy(
        resolver,
        allow_cidrs=options["allow-cidr"],
        allow_hosts=options["allow-host"],
        provider_hosts=options["provider-host"],
        known_hosts_only=options["known-hosts-only"],
        clock=reactor,
    )
    coalescer = WriteCoalescer()
    pool = UpstreamPool(
        reactor,
        coalescer=coalescer,
        connect_timeout=config.connect_timeout,
        idle_timeout=config.pool_idle_timeout,
        max_idle_per_key=config.max_idle_per_host,
        max_head_bytes=config.max_response_head,
        tls_creator=lambda hostname: tls_creator(hostname, trust),
    )
    services = RelayServices(reactor, config, policy, pool, sink)
    base_urls = _base_urls(options["base-url"])
    resource = ProxyResource(
        services, base_urls, host_guard=HostGuard(options["public-name"]), api=api
    )
    site = ProxyServerFactory(
        resource,
        reactor,
        keepalive_timeout=options["client-timeout"],
        head_timeout=options["request-head-timeout"],
        coalescer=coalescer,
        body_timeout=options["request-body-timeout"],
    )
    return site, services, policy


def _base_urls(overrides: dict[str, str]) -> dict[str, str]:
    from parsers.registry import REGISTRY

    urls = {p.id: p.base_url for p in REGISTRY if p.base_url}
    urls.update(overrides)
    return urls


class _OrderedServices(MultiService):
    """Stops its children one after another, last added first.

    C{MultiService} stops every child at once; the proxy must drain its
    in-flight calls before the event sink flushes and closes, so that the
    events of those calls are kept. After a clean stop on SIGTERM the
    process exits 0 rather than re-raising the signal (twistd's default).
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reactor = reactor

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d: Deferred[Any] = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(_stop_child, child)
        d.addCallback(self._stopped_cleanly)
        return d

    def _stopped_cleanly(self, _: object) -> None:
        # twistd re-raises the stopping signal after the reactor stops so the
        # exit status says "killed by SIGTERM"; a drained stop is a success.
        clear_exit_signal(self._reactor, signal.SIGTERM)


def _stop_child(_: object, child: IService) -> Any:
    return child.stopService()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    tuning = ProcessTuning(enabled=not options["no-tuning"])
    tuning.before_services(reactor)
    top = _OrderedServices(reactor)
    sink, sink_service = _make_sink(options, reactor)
    api = _report_api(sink, reactor)
    site, services, policy = build_proxy(
        reactor, options, sink, api.resource if api is not None else None
    )
    if options.get("known-hosts-only-forced"):
        _log.info("listening beyond loopback: --known-hosts-only is on")
    workers = (
        WorkerProcesses(reactor, options["workers"], sys.argv) if options["workers"] > 1 else None
    )
    proxy = ProxyService(
        reactor,
        options["port"],
        site,
        services,
        policy,
        options["drain-timeout"],
        reuse_port=options["workers"] > 1 or bool(options["worker-of"]),
        workers=workers,
        tuning=tuning,
        on_listen_failure=lambda: stop_with_status(reactor, 1),
    )
    if options["worker-of"]:
        ParentWatch(reactor, options["worker-of"]).setServiceParent(top)  # type: ignore[no-untyped-call]
    if sink_service is not None:
        # Started first, stopped last: the sink outlives the drain of in-flight calls.
        sink_service.setServiceParent(top)
    if api is not None:
        api.setServiceParent(top)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    proxy.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
