"""C{ProxyResource}: the proxy as an C{IResource}, and C{ProxySite} to serve it.

Routes (contract, DESIGN.md): C{GET /health}, C{GET /metrics},
C{ANY /proxy} with C{X-LLMObserve-Target-URL}, C{ANY /<provider>/<rest>}
(base-URL mode), C{POST /spans} for the SDK's span records, and, when the
proxy stores its events itself (embedded mode), C{GET /api/*} and the
C{/dashboard} page (C{/} redirects there) as the collector serves them. Before any of them, every
request's C{Host} passes the L{HostGuard} (browser DNS rebinding).

Mounted in any twisted.web C{Site}, the resource works with request bodies
that twisted.web buffered first. Served by L{ProxySite} (a library API for
programs that embed the proxy; C{twistd llmobserve} serves it with its own
channel, C{_channel.ProxyChannel}), request bodies stream upstream as they
arrive.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource, getChildForRequest
from zope.interface import implementer

from llmobserve import __version__
from llmobserve._loglimit import LogLimiter
from llmobserve.hostguard import HostGuard
from llmobserve.proxy._compat import client_gone
from llmobserve.proxy._errors import write_error
from llmobserve.proxy._headers import RequestHead, split_request_headers
from llmobserve.proxy._keygate import AwaitingKey, ClientKeyGate, ClientVerdict
from llmobserve.proxy._policy import Target, TargetRefused, parse_target
from llmobserve.proxy._relay import Relay, RelayServices, write_error_early
from llmobserve.proxy._streaming import IStreamingResource, StreamingRequest

if TYPE_CHECKING:
    from llmobserve.proxy._metrics import MetricsExposition

__all__ = ["ProxyResource", "ProxySite"]

_log = Logger()
_now = time.perf_counter
_OWN_ROUTES = frozenset({b"health", b"metrics", b"spans", b"api", b"dashboard", b""})
_MAX_SPANS_BODY = 4 * 1024 * 1024


class _Refusal:
    """Body receiver for a request refused at header time: drop the body, answer once."""

    __slots__ = ()

    def body_chunk(self, data: bytes) -> None:
        pass

    def body_complete(self) -> None:
        pass

    def client_gone(self) -> None:
        pass


_REFUSAL = _Refusal()


@implementer(IResource, IStreamingResource)
class ProxyResource:
    """The forwarding proxy as a twisted.web resource (a leaf: it routes itself).

    @param services: what every relay shares (config, policy, pool, sink, clock).
    @param base_urls: provider id -> base URL for base-URL mode.
    @param host_guard: the C{Host} check every route passes first (IP
        literals, localhost and C{--public-name} names; defeats browser DNS
        rebinding). Default: no public names.
    @param key_gate: when given, a forwarded call needs a valid
        C{X-LLMObserve-Key} (L{ClientKeyGate}); its project goes into the event.
    """

    isLeaf = True
    streaming = True

    def __init__(
        self,
        services: RelayServices,
        base_urls: Mapping[str, str],
        host_guard: HostGuard | None = None,
        api: Callable[[], Any] | None = None,
        key_gate: ClientKeyGate | None = None,
        dashboard: Callable[[], Any] | None = None,
        session_key: Callable[[Any], bytes | None] | None = None,
    ) -> None:
        self._s = services
        # the dashboard's login (keys required): a session cookie's key, on GET /api
        self._session_key = session_key
        self._key_gate = key_gate
        self._api = api  # /api/...: an embedded proxy's events and report (a resource maker)
        self._dashboard = dashboard  # /dashboard: the page over that API (a resource maker)
        self._base_urls = {k.encode(): v.rstrip("/") for k, v in base_urls.items()}
        self._guard = host_guard or HostGuard()
        self._started = time.time()
        self._exposition: MetricsExposition | None = None  # made on the first scrape
        #: calls refused for their client key: a line each, then a count a second
        self._key_log = LogLimiter(services.clock, burst=1, window=1.0)

    # IResource

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self

    def putChild(self, path: bytes, child: Any) -> None:
        raise NotImplementedError("ProxyResource routes by itself")

    def render(self, request: Any) -> Any:
        if not getattr(request, "reports_client_gone", False):
            # Mounted in a plain Site: begin_streaming has not run (it checks
            # Host for every route) and twisted.web buffered the body already.
            receiver = self.begin_streaming(request)
            if receiver is not None:
                content = request.content
                content.seek(0)
                while chunk := content.read(65536):
                    receiver.body_chunk(chunk)
                receiver.body_complete()
                return server.NOT_DONE_YET
        route = request.postpath[0] if request.postpath else b""
        if route == b"health" and request.method in (b"GET", b"HEAD"):
            return self._json(request, 200, self._health())
        if route == b"metrics" and request.method in (b"GET", b"HEAD"):
            return self._metrics(request)
        if route == b"spans" and request.method == b"POST":
            return self._spans(request)
        if route == b"api":
            return self._api_route(request)
        if route in (b"", b"dashboard") and self._dashboard is not None:
            return self._dashboard_route(request, route)
        write_error(request, 404, "not_found", "no such route; see GET /health")
        return server.NOT_DONE_YET

    def _dashboard_route(self, request: Any, route: bytes) -> Any:
        """C{GET /dashboard} (and its files) of an embedded proxy; C{/}
        redirects there."""
        login = self._session_key is not None and request.method == b"POST"
        if request.method not in (b"GET", b"HEAD") and not login:
            write_error(request, 405, "method_not_allowed", "the dashboard answers GET only")
            return server.NOT_DONE_YET
        if route == b"":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/dashboard")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"see /dashboard\n"
        request.prepath.append(request.postpath.pop(0))
        assert self._dashboard is not None
        return self._dashboard().render(request)

    def _api_route(self, request: Any) -> Any:
        """C{GET /api/events} and C{/api/report}, as the collector serves
        them, over the embedded store; a JSON 404 elsewhere."""
        if self._api is None:
            write_error(
                request,
                404,
                "not_found",
                "this proxy keeps no store: ask its collector's /api (see GET /health)",
            )
            return server.NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, 405, "method_not_allowed", "/api answers GET only")
            return server.NOT_DONE_YET
        request.prepath.append(request.postpath.pop(0))
        if not request.postpath:
            write_error(request, 404, "not_found", "see /api/events and /api/report")
            return server.NOT_DONE_YET
        gate = self._key_gate
        if gate is None:
            return getChildForRequest(self._api(), request).render(request)
        # keys required: a read key (its project only) or an admin key
        key = _presented_key(request)
        if key is None and self._session_key is not None:  # GET only: never a CSRF
            key = self._session_key(request)
        return self._after_verdict(gate, request, key, self._api_with)

    @staticmethod
    def _after_verdict(
        gate: ClientKeyGate,
        request: Any,
        key: bytes | None,
        answer: Callable[[Any, ClientVerdict], Any],
    ) -> Any:
        """C{answer(request, verdict)} once the key's verdict is known: at
        once when remembered, else when the check comes back (unless the
        client left meanwhile)."""
        verdict = gate.cached(key)
        if verdict is not None:
            return answer(request, verdict)

        def decided(verdict: ClientVerdict) -> None:
            if request.finished or client_gone(request):
                return
            body = answer(request, verdict)
            if body is not server.NOT_DONE_YET:
                request.write(body)
                request.finish()

        gate.check(key).addCallback(decided)
        return server.NOT_DONE_YET

    def _api_with(self, request: Any, verdict: ClientVerdict) -> Any:
        assert self._api is not None
        if not verdict.allows("read"):
            status, kind, message = _key_refusal(verdict, "read")
            write_error(request, status, kind, message)
            return server.NOT_DONE_YET
        if verdict.scope != "admin":
            request.args[b"project"] = [(verdict.project or "").encode("utf-8")]
        return getChildForRequest(self._api(), request).render(request)

    # IStreamingResource

    def begin_streaming(self, request: Any) -> Any:
        """Check Host (every route), then route the request at header time;
        start the relay for forwarding routes. C{None}: the proxy's own
        route or no route, answered by C{render}."""
        t0 = _now()
        started_at = time.time()
        clock = self._s.clock
        pairs = getattr(request, "raw_headers", None)
        if pairs is None:
            pairs = [
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ]
        hosts = getattr(request, "host_values", None)  # the lean channel gathered them
        if hosts is None:
            hosts = [v for n, v in pairs if n.lower() == b"host"]
        refused = self._guard.refusal(hosts)
        if refused is not None:
            write_error_early(request, refused.status, refused.kind, refused.message, clock)
            return _REFUSAL
        postpath = request.postpath
        route = postpath[0] if postpath else b""
        if route in _OWN_ROUTES:
            return None
        if request.uri[:1] != b"/":
            write_error_early(
                request,
                400,
                "bad_request",
                "absolute-form and CONNECT requests are not proxied",
                clock,
            )
            return _REFUSAL
        head = split_request_headers(pairs)
        if head.via_loop:
            write_error_early(request, 508, "loop", "request already passed this proxy", clock)
            return _REFUSAL
        if head.content_length is not None and head.content_length > self._s.config.max_body:
            write_error_early(
                request,
                413,
                "body_too_large",
                f"request body over the {self._s.config.max_body}-byte limit",
                clock,
            )
            return _REFUSAL
        try:
            target, provider = self._target_for(request, route, head)
        except TargetRefused as e:
            write_error_early(request, e.status, e.kind, e.message, clock)
            return _REFUSAL
        if target is None:
            return None  # unknown route: render answers 404
        gate = self._key_gate
        if gate is not None:
            key = head.ours.get(b"key")
            verdict = gate.cached(key)
            if verdict is None:
                return self._await_key(request, head, target, provider, key, started_at, t0)
            if not verdict.allows("ingest"):
                self._refuse_key(request, verdict)
                return _REFUSAL
            head.project = verdict.project
        relay = Relay(self._s, request, head, target, provider, started_at=started_at, t0=t0)
        relay.start(watch_client=not getattr(request, "reports_client_gone", False))
        return relay

    def _await_key(
        self,
        request: Any,
        head: RequestHead,
        target: Target,
        provider: str | None,
        key: bytes | None,
        started_at: float,
        t0: float,
    ) -> AwaitingKey:
        """The call waits (its body held) for its key's first verdict."""
        assert self._key_gate is not None

        def start(project: str | None) -> Relay:
            head.project = project
            relay = Relay(self._s, request, head, target, provider, started_at=started_at, t0=t0)
            relay.start(watch_client=not getattr(request, "reports_client_gone", False))
            return relay

        waiting = AwaitingKey(request, start, lambda v: self._refuse_key(request, v))
        self._key_gate.check(key).addCallback(waiting.decided)
        return waiting

    def _refuse_key(self, request: Any, verdict: ClientVerdict) -> None:
        """A call without a valid client key: answered, counted and logged,
        not stored (an unauthenticated client cannot write to the store)."""
        status, kind, message = _key_refusal(verdict, "ingest")
        write_error_early(request, status, kind, message, self._s.clock)
        self._key_refused(request, status, kind)

    def _key_refused(self, request: Any, status: int, kind: str) -> None:
        """Count and log (at most a line a second) a refusal for a client key."""
        self._s.stats["key_refused_total"] += 1
        if not self._key_log.allow("calls refused for their client key"):
            return
        path = (request.uri or b"").split(b"?", 1)[0].decode("latin-1")  # a query may hold secrets
        _log.info(
            "{method} {path} -> {status} {kind} (client key), not forwarded",
            method=request.method.decode("latin-1"),
            path="".join(c if c.isprintable() else "?" for c in path[:200]),  # one line, always
            status=status,
            kind=kind,
        )

    # Routing

    def _target_for(
        self, request: Any, route: bytes, head: RequestHead
    ) -> tuple[Target | None, str | None]:
        uri: bytes = request.uri
        prefix = len(b"/".join(request.prepath)) + 1 if request.prepath else 0
        rel = uri[prefix:]
        if route == b"proxy":
            raw = head.ours.get(b"target-url")  # head.target_url(), inline
            if raw is None:
                raise TargetRefused(
                    "bad_target", "X-LLMObserve-Target-URL header is required for /proxy"
                )
            try:
                url = raw.decode("ascii")
            except UnicodeDecodeError:
                raise TargetRefused("bad_target", "target URL must be ASCII") from None
            _, sep, query = rel.partition(b"?")
            if sep and query:
                url = _merge_query(url, query.decode("latin-1"))
            return parse_target(url), None
        base = self._base_urls.get(route)
        if base is None:
            return None, None
        rest = rel[len(route) + 1 :].decode("latin-1")
        if rest and rest[0] not in "/?":
            return None, None
        return parse_target(base + rest), route.decode()

    # Own routes

    def _health(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok",
            "service": "llmobserve-proxy",
            "version": __version__,
            "uptime_s": round(time.time() - self._started, 3),
            "pid": os.getpid(),
            "in_flight": self._s.stats["in_flight"],
        }
        try:
            body.update(self._s.sink.health())
        except Exception:
            _log.failure("sink health failed")
            body["collector"] = {"state": "unknown"}
        return body

    def _metrics(self, request: Any) -> bytes:
        from llmobserve.proxy import _metrics  # prometheus_client, on the first scrape

        if self._exposition is None:
            self._exposition = _metrics.MetricsExposition(self._s)
        body = self._exposition.render()
        request.setHeader(b"Content-Type", _metrics.CONTENT_TYPE)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _spans(self, request: Any) -> Any:
        """C{POST /spans}; where clients need a key for their calls, their
        spans need one too (an ingest key: they become events)."""
        gate = self._key_gate
        if gate is None:
            return self._take_spans(request)
        return self._after_verdict(gate, request, _presented_key(request), self._spans_with)

    def _spans_with(self, request: Any, verdict: ClientVerdict) -> Any:
        if not verdict.allows("ingest"):
            status, kind, message = _key_refusal(verdict, "ingest")
            write_error(request, status, kind, message)
            self._key_refused(request, status, kind)
            return server.NOT_DONE_YET
        return self._take_spans(request)

    def _take_spans(self, request: Any) -> bytes:
        data = request.content.read(_MAX_SPANS_BODY + 1)
        if len(data) > _MAX_SPANS_BODY:
            write_error(request, 413, "body_too_large", "span batch too large")
            return server.NOT_DONE_YET  # type: ignore[return-value]  # twisted.web convention
        try:
            spans = json.loads(data)
            if isinstance(spans, dict):
                spans = [spans]
            if not isinstance(spans, list) or not all(isinstance(x, dict) for x in spans):
                raise ValueError("expected a JSON array of objects")
        except ValueError as e:
            write_error(request, 400, "bad_request", f"bad span batch: {e}")
            return server.NOT_DONE_YET  # type: ignore[return-value]  # twisted.web convention
        self._s.sink.spans_received(spans)
        return self._json(request, 202, {"accepted": len(spans)})

    @staticmethod
    def _json(request: Any, status: int, payload: Any) -> bytes:
        body = json.dumps(payload).encode()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"Cache-Control", b"no-store")
        return body


def _presented_key(request: Any) -> bytes | None:
    """The key a request to the proxy's own routes shows: C{X-LLMObserve-Key},
    else C{Authorization: Bearer}."""
    key: bytes | None = request.getHeader(b"x-llmobserve-key")
    if key is None:
        kind, _, value = (request.getHeader(b"authorization") or b"").partition(b" ")
        key = value.strip() if kind.lower() == b"bearer" else None
    return key


def _key_refusal(verdict: ClientVerdict, scope: str) -> tuple[int, str, str]:
    """Status, error kind and message for a key that does not allow C{scope}."""
    if verdict.reason == "unavailable":
        return 503, "key_check_unavailable", "the key could not be checked (key store unreachable)"
    if verdict.reason is None and scope != "ingest":
        return 403, "forbidden", verdict.message(scope)
    # A call is refused with 401 even for a valid key of another scope: the
    # SDK takes a 403 with our error header as "nothing went upstream, go
    # direct", and a call with the wrong key must not leave untracked.
    return 401, "unauthorized", verdict.message(scope)


def _merge_query(url: str, extra: str) -> str:
    """Append C{extra} query parameters to C{url}'s own, before any fragment."""
    base, hash_, fragment = url.partition("#")
    joiner = "&" if "?" in base else "?"
    if base.endswith(("?", "&")):
        joiner = ""
    return base + joiner + extra + hash_ + fragment


class ProxySite(server.Site):
    """A C{Site} whose requests stream their bodies to the proxy resource."""

    requestFactory = StreamingRequest
    noisy = False

    def __init__(self, resource: ProxyResource, *, client_timeout: float = 60.0, **kw: Any):
        super().__init__(resource, timeout=client_timeout, **kw)  # type: ignore[no-untyped-call]  # Site is unannotated

    def log(self, request: Any) -> None:
        """No access log: each exchange is recorded once, by the transaction sink."""
