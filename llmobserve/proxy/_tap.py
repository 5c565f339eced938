"""C{twistd llmobserve}: the proxy's command-line options and service tree."""

from __future__ import annotations

import ipaddress
import os
import re
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
from llmobserve._tlsport import TLSHintReactor
from llmobserve._twistd import brief_usage_error, foreground_without_pidfile
from llmobserve.endpoints import (
    check_port,
    listen_endpoint,
    listens_beyond_loopback,
)
from llmobserve.hostguard import HostGuard, public_name
from llmobserve.providers import UnknownProviderError, check_provider_id
from llmobserve.proxy._channel import ProxyServerFactory
from llmobserve.proxy._compat import clear_exit_signal
from llmobserve.proxy._config import DEFAULT_MAX_BODY, RelayConfig
from llmobserve.proxy._dashlogin import EmbeddedDashboardLogin
from llmobserve.proxy._gqllimits import GraphQLLimit, GraphQLLimits
from llmobserve.proxy._keygate import ClientKeyGate, collector_lookup, store_lookup
from llmobserve.proxy._logsink import LoggingSink
from llmobserve.proxy._policy import (
    DnsServerResolver,
    OverrideResolver,
    TargetPolicy,
    TargetRefused,
    TwistedResolver,
    parse_dns_server,
    parse_target,
)
from llmobserve.proxy._relay import RelayServices
from llmobserve.proxy._resource import ProxyResource
from llmobserve.proxy._rotate import RotatingEndpoint
from llmobserve.proxy._streamusage import StreamUsagePolicy
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
from parsers.streamusage import STREAM_USAGE_MODES

__all__ = ["Options", "makeService"]

_log = Logger()
#: what plain text to the proxy's TLS port (C{--port ssl:...}) is told
_TLS_HINT = "this proxy's port speaks TLS: use https:// in proxy_url (or the base URL)"


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
            "collector-key",
            None,
            None,
            "The link key (an ingest key from llmobserve keys create) sent to a collector "
            "that requires keys (default: $LLMOBSERVE_COLLECTOR_KEY).",
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
            "shared-budgets",
            None,
            "Other proxies enforce the budgets of this store file too: spend only the "
            "slices the store grants (on by itself with --workers).",
        ],
        [
            "known-hosts-only",
            None,
            "Forward only to registry hosts, --allow-host and --provider-host "
            "(default when listening beyond loopback).",
        ],
        [
            "require-keys",
            None,
            "Forward a call only with a valid X-LLMObserve-Key (ingest or admin scope; "
            "checked by the collector, or in the embedded store); on by default when "
            "listening beyond loopback.",
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
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options is unannotated
        self["allow-host"] = []
        self["allow-cidr"] = []
        self["provider-host"] = {}
        self["base-url"] = {}
        self["resolve"] = {}
        self["dns-server"] = []
        self["public-name"] = []
        self["stream-usage"] = {}
        self["graphql-max-depth"] = {}
        self["graphql-max-complexity"] = {}
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

    def opt_stream_usage(self, spec: str) -> None:
        """PROVIDER=inject|estimate|off: how a stream without usage is priced
        (default openai=inject, estimate for the rest). inject adds
        stream_options.include_usage to a streamed chat/completions request
        and removes the usage chunk from the client's stream; estimate counts
        tokens locally; off leaves it unpriced. Repeatable."""
        provider, mode = _pair(spec, "--stream-usage")
        if mode not in STREAM_USAGE_MODES:
            raise usage.UsageError(
                f"--stream-usage {provider}: {mode!r} is not inject|estimate|off"
            )
        self["stream-usage"][provider] = mode

    def opt_graphql_max_depth(self, spec: str) -> None:
        """HOST[:PORT]=N: refuse (400) GraphQL queries to HOST nested deeper
        than N fields, before they go upstream. Repeatable."""
        host, value = _pair(spec, "--graphql-max-depth")
        self["graphql-max-depth"][host.lower()] = _count(value, "--graphql-max-depth")

    def opt_graphql_max_complexity(self, spec: str) -> None:
        """HOST[:PORT]=N: refuse (400) GraphQL queries to HOST whose complexity
        (fields times page sizes) is over N, before they go upstream. Repeatable."""
        host, value = _pair(spec, "--graphql-max-complexity")
        self["graphql-max-complexity"][host.lower()] = _count(value, "--graphql-max-complexity")

    def opt_base_url(self, spec: str) -> None:
        """PROVIDER=URL: base-URL mode /PROVIDER/... goes to URL. Repeatable."""
        provider, url = _pair(spec, "--base-url")
        provider = _provider_id(provider, "--base-url")
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(f"--base-url {provider}: URL must be http(s)")
        try:
            parse_target(url)
        except TargetRefused as refused:
            raise usage.UsageError(f"--base-url {provider}: {refused.message}") from None
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
        if self["collector-key"] is None:
            self["collector-key"] = os.environ.get("LLMOBSERVE_COLLECTOR_KEY") or None
        if self["collector-ca-file"] is not None:
            if not str(self["collector"] or "").startswith("https://"):
                raise usage.UsageError("--collector-ca-file needs an https:// --collector")
            try:
                load_extra_trust(self["collector-ca-file"])
            except (ValueError, OSError) as e:
                raise usage.UsageError(f"--collector-ca-file: {e}") from None
        if listens_beyond_loopback(self["port"]):
            self["require-keys"] = True
        if self["require-keys"] and self["no-events"] and not self["collector"]:
            raise usage.UsageError(
                "client keys are required (--require-keys, or listening beyond loopback) and "
                "--no-events keeps no key store: give --collector URL to check them there"
            )
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
    return RotatingEndpoint(endpoints, urls)


def _make_sink(options: Options, reactor: Any) -> tuple[ITransactionSink, IService | None]:
    """The transaction sink: the event pipeline, or a log line per call with --no-events."""
    if options["no-events"]:
        return LoggingSink(reactor), None
    from llmobserve.events import make_event_sink  # the parse pipeline, not loaded by --no-events

    return make_event_sink(
        reactor,
        collector_url=options["collector"],
        collector_urls=options["collectors"],
        db_path=options["db"],
        spool_dir=options["spool-dir"],
        endpoint=_collector_endpoint(reactor, options),
        store_factory=open_embedded_store,
        no_estimate=StreamUsagePolicy(options["stream-usage"]).no_estimate,
        collector_key=options["collector-key"],
    )


def open_embedded_store(path: str) -> Any:
    """The embedded store: the collector's C{EventStore} with C{synchronous=NORMAL}
    (durable against a crash of the process; see C{llmobserve.events._embedded})."""
    from llmobserve.collector import EventStore

    return EventStore(path, synchronous="NORMAL")


class EmbeddedReportApi(Service):
    """C{/api/*} over an embedded proxy's own store, and the C{/dashboard}
    page that reads it, as the collector serves them. The reader (a thread and an SQLite
    connection of its own) opens on the first request: a proxy nobody asks
    pays nothing for it. It watches the store's file as the writer does: a
    file removed or replaced under the proxy is reopened at the next
    request, so the report shows the store the writer refills rather than
    the unlinked file."""

    def __init__(self, reactor: Any, db_path: str) -> None:
        self._reactor = reactor
        self._db_path = db_path
        self._reader: Any = None
        self._api: Any = None
        self._dashboard: Any = None

    def resource(self) -> Any:
        """The C{/api} resource tree (reactor thread)."""
        if self._api is None:
            from llmobserve.collector import EventStore, StoreThread, api_branch

            db_path = self._db_path
            self._reader = StoreThread(
                self._reactor,
                lambda: EventStore(db_path),
                "llmobserve-report-reader",
                watch=db_path,
            )
            self._reader.startService()
            self._api = api_branch(self._reader)
        return self._api

    def dashboard(self) -> Any:
        """The C{/dashboard} resource (static files: no reader needed)."""
        if self._dashboard is None:
            from llmobserve.collector import DashboardResource

            self._dashboard = DashboardResource()
        return self._dashboard

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


def _client_key_gate(
    options: Options, reactor: Any, sink: ITransactionSink
) -> tuple[ClientKeyGate | None, Service | None]:
    """The client-key check, when the proxy requires keys: against the
    collector (C{/api/whoami}) or the embedded store file."""
    if not options["require-keys"]:
        return None, None
    if options["collector"]:
        lookup = collector_lookup(options["collector"], options["collector-ca-file"])
        return ClientKeyGate(reactor, lookup), None
    store_path = sink.store_path
    assert store_path is not None  # postOptions refuses --no-events without a collector
    service = store_lookup(reactor, store_path)
    return ClientKeyGate(reactor, service), service


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
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
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
        endpoint = serverFromString(TLSHintReactor(self._reactor, _TLS_HINT), self._description)
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
            "llmobserve proxy listening on {scheme}://{host}:{port}",
            scheme="https" if self._description.startswith("ssl:") else "http",
            host=shown,
            port=address.port,
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
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self._workers is not None:
            self._workers.terminate()  # siblings drain at the same time as this process
        port, self._port = self._port, None
        stopped: Deferred[Any] = succeed(None) if port is None else port.stopListening()  # type: ignore[assignment]  # TCP: a Deferred
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
                # the calls still running end now, as shutdown_aborted: their
                # events reach the sink before it stops (issue 13 item 1)
                cut = self._services.deadlines.abort_all()
                if cut:
                    _log.warn(
                        "drain deadline: {n} calls cut off (recorded as shutdown_aborted)", n=cut
                    )
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
    key_gate: ClientKeyGate | None = None,
    dashboard: Callable[[], Any] | None = None,
    session_key: Callable[[Any], bytes | None] | None = None,
) -> tuple[Any, RelayServices, TargetPolicy]:
    """The site, shared services and policy for these options.

    @param api: makes the C{/api} resource of an embedded store.
    @param dashboard: makes the C{/dashboard} resource that reads it.
    @param session_key: the key behind a dashboard session's cookie (the
        dashboard has a login: keys are required).
    """
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
        provider_hosts={**_base_url_hosts(options["base-url"]), **options["provider-host"]},
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
    stream_usage = StreamUsagePolicy(options["stream-usage"], options["provider-host"])
    services = RelayServices(
        reactor,
        config,
        policy,
        pool,
        sink,
        stream_usage,
        graphql_limits=_graphql_limits(options),
    )
    base_urls = _base_urls(options["base-url"])
    resource = ProxyResource(
        services,
        base_urls,
        host_guard=HostGuard(options["public-name"]),
        api=api,
        key_gate=key_gate,
        dashboard=dashboard,
        session_key=session_key,
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


def _count(value: str, flag: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise usage.UsageError(f"{flag}: {value!r} is not a whole number") from None
    if n < 0:
        raise usage.UsageError(f"{flag}: must not be negative")
    return n


def _graphql_limits(options: Options) -> GraphQLLimits | None:
    depth: dict[str, int] = options["graphql-max-depth"]
    complexity: dict[str, int] = options["graphql-max-complexity"]
    hosts = set(depth) | set(complexity)
    if not hosts:
        return None
    return GraphQLLimits({h: GraphQLLimit(depth.get(h), complexity.get(h)) for h in hosts})


def _base_urls(overrides: dict[str, str]) -> dict[str, str]:
    from parsers.registry import REGISTRY

    urls = {p.id: p.base_url for p in REGISTRY if p.base_url}
    urls.update(overrides)
    for provider, url in overrides.items():
        _warn_doubled_version(provider, url, REGISTRY.base_url(provider))
    return urls


def _base_url_hosts(overrides: dict[str, str]) -> dict[str, str]:
    """C{HOST:PORT} to provider for each C{--base-url}: the operator named
    that host, so it is admitted like a C{--provider-host} (a local server or
    a gateway on a private address would otherwise be refused)."""
    hosts = {}
    for provider, url in overrides.items():
        target = parse_target(url)  # checked by Options.opt_base_url
        host = f"[{target.host}]" if ":" in target.host else target.host
        hosts[f"{host}:{target.port}"] = provider
    return hosts


def _warn_doubled_version(provider: str, url: str, public: str | None) -> None:
    """Warn when an override ends in the API version that clients put in their
    path too (C{--base-url openai=http://127.0.0.1:18080/v1} would send
    C{/openai/v1/chat/completions} to C{.../v1/v1/chat/completions})."""
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    if public is None or "//" in tail or not _API_VERSION.fullmatch(tail):
        return
    if public.rstrip("/").endswith("/" + tail):
        return  # the public base URL has the version too: clients leave it out
    _log.warn(
        "--base-url {provider}={url}: base-URL mode appends the client's whole path, "
        "so /{provider}/{tail}/... goes to {url}/{tail}/...; give the URL that replaces "
        "{public} (without /{tail})",
        provider=provider,
        url=url.rstrip("/"),
        tail=tail,
        public=public,
    )


#: The last path segment of a URL that looks like an API version (v1, v1beta, v2alpha1).
_API_VERSION = re.compile(r"v[0-9]+(?:(?:alpha|beta)[0-9]*)?")


class _OrderedServices(MultiService):
    """Stops its children one after another, last added first.

    C{MultiService} stops every child at once; the proxy must drain its
    in-flight calls before the event sink flushes and closes, so that the
    events of those calls are kept. After a clean stop on SIGTERM the
    process exits 0 rather than re-raising the signal (twistd's default).
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService is unannotated
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


def _budget_poller(
    reactor: Any, sink: ITransactionSink, services: RelayServices, options: Options
) -> IService | None:
    """Budgets from the embedded store: loaded now (a restart never resets
    one), then polled every second; with a collector, from its
    /api/budgets. With a collector, --workers or --shared-budgets each
    process spends the slices the store (or collector) grants it."""
    from llmobserve.proxy._budgetpoll import BudgetPoller
    from llmobserve.proxy._budgets import BudgetLedger

    store_path: str | None = sink.store_path
    collector: str | None = options["collector"] if store_path is None else None
    if store_path is None and not collector:
        return None
    shared = bool(
        collector or options["shared-budgets"] or options["workers"] > 1 or options["worker-of"]
    )
    ledger = BudgetLedger(reactor.seconds, shared=shared)
    if collector and "://" not in collector:
        collector = "http://" + collector
    # every --collector: a read that cannot reach one moves on to the next
    urls = [u if "://" in u else "http://" + u for u in options["collectors"]] if collector else []
    poller = BudgetPoller(
        reactor,
        ledger,
        store_path,
        collector_url=collector,
        collector_urls=urls,
        collector_key=options["collector-key"],
        ca_file=options["collector-ca-file"],
    )
    poller.load_now()
    services.budgets = ledger
    if shared:
        _log.info(
            "budgets shared with other processes on {store}: this one spends the slices"
            " it is granted",
            store=", ".join(urls) if urls else collector or store_path,
        )
    return poller


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    tuning = ProcessTuning(enabled=not options["no-tuning"])
    tuning.before_services(reactor)
    top = _OrderedServices(reactor)
    sink, sink_service = _make_sink(options, reactor)
    api = _report_api(sink, reactor)
    gate, gate_service = _client_key_gate(options, reactor, sink)
    dashboard = api.dashboard if api is not None else None
    login = EmbeddedDashboardLogin(reactor, gate) if api is not None and gate is not None else None
    site, services, policy = build_proxy(
        reactor,
        options,
        sink,
        api.resource if api is not None else None,
        key_gate=gate,
        dashboard=login.resource if login is not None else dashboard,
        session_key=login.session_key if login is not None else None,
    )
    if options.get("known-hosts-only-forced"):
        _log.info("listening beyond loopback: --known-hosts-only is on")
    if gate is not None:
        _log.info(
            "client keys required: calls and POST /spans need an ingest key in"
            " X-LLMObserve-Key (checked {where}); /health and /metrics stay open",
            where=f"by the collector {options['collector']}"
            if options["collector"]
            else f"against the keys of {sink.store_path}",
        )
    budgets = _budget_poller(reactor, sink, services, options)
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
        ParentWatch(reactor, options["worker-of"]).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    if sink_service is not None:
        # Started first, stopped last: the sink outlives the drain of in-flight calls.
        sink_service.setServiceParent(top)
    if gate_service is not None:
        gate_service.setServiceParent(top)
    if api is not None:
        api.setServiceParent(top)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    if budgets is not None:
        budgets.setServiceParent(top)
    proxy.setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    return top
