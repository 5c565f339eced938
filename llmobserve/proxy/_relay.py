"""One exchange, end to end: client request -> upstream -> client response.

The relay owns the exchange's state: it resolves the target through the
policy, takes a pooled upstream connection, streams the request body up
and the response body down with backpressure both ways, enforces the
timeouts, and when everything is over builds exactly one L{Transaction}
for the sink. It never reads a body whole and never retries a request
whose bytes may have left the proxy, except an idempotent bodiless
request on a reused keep-alive connection that died before any answer.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from zope.interface import implementer

from llmobserve.proxy._bodytap import BodyTap
from llmobserve.proxy._budgets import (
    REMAINING_HEADER as _REMAINING_HEADER,
)
from llmobserve.proxy._budgets import BudgetHold, BudgetLedger, ScopeKey
from llmobserve.proxy._compat import client_gone
from llmobserve.proxy._config import RelayConfig
from llmobserve.proxy._errors import prepare_error, write_error
from llmobserve.proxy._gqllimits import GraphQLLimits
from llmobserve.proxy._headers import RequestHead, client_response_headers
from llmobserve.proxy._policy import ResolvedTarget, Target, TargetPolicy, TargetRefused
from llmobserve.proxy._refusals import BudgetRefusal, RateRefusal
from llmobserve.proxy._states import StateEnum, Transitions
from llmobserve.proxy._streaming import finish_early, pause_client, resume_client
from llmobserve.proxy._streamusage import StreamUsagePolicy, UsageInjection
from llmobserve.proxy._upstream import UpstreamConnection, UpstreamPool
from llmobserve.transaction import ITransactionSink, Outcome, Transaction
from parsers import worst_case_fields
from parsers.streamusage import UsageChunkFilter

__all__ = ["Relay", "RelayServices", "RelayState"]

_log = Logger()
_now = time.perf_counter
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})

#: Seconds a relay waits, after a client closed mid-response, for the
#: upstream's end of message (see L{Relay.client_gone}).
CLIENT_CLOSE_GRACE = 0.25
_NO_BODY_STATUS = frozenset({204, 304})


class DeadlineSweeper:
    """Checks the deadlines of active relays a few times a second.

    Timeouts here are seconds long, so a sweep every C{interval} seconds is
    precise enough and costs nothing per request, where a C{callLater} and
    its cancellation per request would.
    """

    def __init__(self, clock: Any, interval: float = 0.25) -> None:
        self._clock = clock
        self._interval = interval
        self._relays: set[Relay] = set()
        self._call: IDelayedCall | None = None

    def add(self, relay: Relay) -> None:
        self._relays.add(relay)
        if self._call is None:
            self._call = self._clock.callLater(self._interval, self._sweep)

    def discard(self, relay: Relay) -> None:
        self._relays.discard(relay)

    def _sweep(self) -> None:
        self._call = None
        now = self._clock.seconds()
        for relay in [r for r in self._relays if r.deadline <= now]:
            relay.deadline_passed(now)
        if self._relays:
            self._call = self._clock.callLater(self._interval, self._sweep)

    def abort_all(self) -> int:
        """Cut every relay still under watch (the drain deadline passed);
        return how many. Each ends at once, so its event reaches the sink
        before the sink stops."""
        relays = list(self._relays)
        for relay in relays:
            relay.abort_for_shutdown()
        return len(relays)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


class RelayServices:
    """What every relay of one proxy shares: config, policy, pool, sink, clock."""

    __slots__ = (
        "budgets",
        "clock",
        "config",
        "deadlines",
        "gate_buffer",
        "graphql_limits",
        "policy",
        "pool",
        "sink",
        "stats",
        "stream_usage",
    )

    def __init__(
        self,
        clock: Any,
        config: RelayConfig,
        policy: TargetPolicy,
        pool: UpstreamPool,
        sink: ITransactionSink,
        stream_usage: StreamUsagePolicy | None = None,
        budgets: BudgetLedger | None = None,
        graphql_limits: GraphQLLimits | None = None,
    ) -> None:
        self.budgets = budgets  # checked before a call goes upstream when any is defined
        self.graphql_limits = graphql_limits  # per host, checked likewise
        self.clock = clock
        #: C{--stream-usage}: which streamed requests get usage injected.
        self.stream_usage = stream_usage if stream_usage is not None else StreamUsagePolicy()
        self.config = config
        #: request bytes held while the budgets wait for the whole body
        self.gate_buffer = max(config.client_buffer, config.request_tap)
        self.policy = policy
        self.pool = pool
        self.sink = sink
        self.deadlines = DeadlineSweeper(clock)
        #: C{key_refused_total}: calls answered 401/403/503 for their client
        #: key (not relayed: no event, see ProxyResource._refuse_key)
        self.stats: dict[str, int] = {"in_flight": 0, "requests_total": 0, "key_refused_total": 0}


class RelayState(StateEnum):
    """Where a L{Relay}'s exchange is (see docs/ARCHITECTURE.md)."""

    BEFORE_RESPONSE = "before_response"  # checking, connecting, sending; no response head yet
    RESPONDING = "responding"  # the response head went to the client; relaying its body
    CLIENT_LEFT = "client_left"  # the client closed mid-response; waiting for the end (grace)
    ENDED = "ended"  # the transaction is recorded; nothing more happens


_BEFORE_RESPONSE, _RESPONDING, _CLIENT_LEFT, _ENDED = RelayState
#: The legal moves; ending an ended relay does nothing and is not a move.
RELAY_TRANSITIONS: Transitions[RelayState] = Transitions(
    "Relay",
    {
        _BEFORE_RESPONSE: [_RESPONDING, _ENDED],
        _RESPONDING: [_CLIENT_LEFT, _ENDED],
        _CLIENT_LEFT: [_ENDED],
        _ENDED: [],
    },
)


@implementer(IPushProducer)
class Relay:
    """Relays one request. Created at header time; the body arrives afterwards.

    The exchange's lifecycle is the one C{state} field (L{RelayState}, moves
    checked by L{RELAY_TRANSITIONS}). Apart from it: whether the request
    body has all arrived (it streams on while the response does), the
    connection being made or used, why the client is paused, the one retry
    taken, and the deadline armed.
    """

    __slots__ = (
        "_body_bytes",
        "_body_done",
        "_client_left",
        "_client_paused_for",
        "_conn",
        "_connecting",
        "_deadline_kind",
        "_gate",
        "_head",
        "_hold",
        "_last_activity",
        "_method",
        "_paused_at",
        "_pending",
        "_pending_size",
        "_provider_hint",
        "_req_tap",
        "_request",
        "_resolved",
        "_resp_filter",
        "_resp_tap",
        "_response_bytes",
        "_response_headers",
        "_retried",
        "_s",
        "_started_at",
        "_status",
        "_t0",
        "_t_connect",
        "_t_first",
        "_t_sent",
        "_t_upstream_done",
        "_target",
        "_usage",
        "deadline",
        "state",
    )

    def __init__(
        self,
        services: RelayServices,
        request: Request,
        head: RequestHead,
        target: Target,
        provider_hint: str | None,
        *,
        started_at: float,
        t0: float,
    ) -> None:
        self._s = services
        self._request = request
        self._head = head
        self._target = target
        self._provider_hint = provider_hint
        self._method: bytes = request.method
        self._started_at = started_at
        self._t0 = t0
        cfg = services.config
        self._req_tap = BodyTap(cfg.request_tap)
        self._resp_tap = BodyTap(cfg.response_tap_head, cfg.response_tap_tail)
        self._pending: list[bytes] | None = []  # body bytes waiting for the connection
        self._pending_size = 0
        self._body_done = False
        self._body_bytes = 0
        self._response_bytes = 0
        self._client_paused_for: set[str] = set()
        self._client_left: IDelayedCall | None = None  # the grace of client_gone
        self._conn: UpstreamConnection | None = None
        self._connecting: Deferred[Any] | None = None
        self._resolved: ResolvedTarget | None = None
        self._status: int | None = None
        self._response_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.state = _BEFORE_RESPONSE
        self._retried = False
        self._t_sent: float | None = None
        self._t_connect = 0.0
        self._t_first: float | None = None
        self._t_upstream_done: float | None = None
        self._last_activity = 0.0
        self.deadline = float("inf")  # clock time; checked by the DeadlineSweeper
        self._paused_at: float | None = None  # when the client's socket filled up
        self._deadline_kind = ""
        #: The one hook of C{--stream-usage inject}: set for the requests it rewrites.
        self._usage: UsageInjection | None = (
            services.stream_usage.plan(
                self._method, target.path, target.host, target.port, provider_hint, head
            )
            if self._method == b"POST"
            else None
        )
        self._resp_filter: UsageChunkFilter | None = None
        budgets = services.budgets
        gql = services.graphql_limits
        # True until the budgets (or a GraphQL limit) have seen the whole
        # request: nothing connects before
        self._gate = (budgets is not None and budgets.active) or (
            gql is not None and gql.for_target(target.host, target.port) is not None
        )
        self._hold: BudgetHold | None = None
        services.stats["in_flight"] += 1
        services.stats["requests_total"] += 1

    # Start

    def start(self, *, watch_client: bool = True) -> None:
        """Check the target, then connect; the client may still be sending.

        @param watch_client: subscribe to the request's C{notifyFinish} to
            learn of a client disconnect. L{StreamingRequest} calls
            L{client_gone} itself, which saves a Deferred per request.
        """
        if watch_client:
            self._request.notifyFinish().addErrback(lambda f: self.client_gone())
        try:
            resolved = self._s.policy.check_now(self._target)
        except TargetRefused as refused:
            self._fail_before_response(
                refused.status, refused.kind, refused.message, _refusal_outcome(refused.status)
            )
            return
        if resolved is not None:
            self._target_checked(resolved)
            return
        d = self._s.policy.check(self._target)
        self._connecting = d
        d.addCallbacks(self._target_checked, self._target_refused)

    def _target_refused(self, failure: Failure) -> None:
        self._connecting = None
        if self.state is _ENDED:
            return
        if failure.check(TargetRefused):
            exc: Any = failure.value
            self._fail_before_response(
                exc.status, exc.kind, exc.message, _refusal_outcome(exc.status)
            )
        elif failure.check(CancelledError):
            return
        else:
            _log.failure("target check failed", failure)
            self._fail_before_response(
                502, "upstream_unreachable", "cannot resolve target", Outcome.PROXY_ERROR
            )

    def _target_checked(self, resolved: ResolvedTarget) -> None:
        self._connecting = None
        if self.state is _ENDED:
            return
        self._resolved = resolved
        if self._provider_hint is None:
            self._provider_hint = resolved.provider_hint
        usage = self._usage
        if usage is not None and usage.holding:
            return  # connects once the body is read (see _release_held_body)
        if self._gate:
            # the check waits for the whole body (or for more of it than is
            # held), as it does the rest of the time: a call saved then
            if self._body_done or self._pending_size > self._s.gate_buffer:
                self._check_budgets()
            return
        self._connect()

    def _check_budgets(self) -> None:
        """Once the target is checked and the body is in (or too big to
        hold): reserve the call's worst case, or refuse it with a 402."""
        if self._resolved is None or self.state is _ENDED:
            return
        if not self._body_done and self._pending_size <= self._s.gate_buffer:
            return
        self._gate = False
        body = self._req_tap.whole() if self._body_done else None
        s = self._s
        if s.graphql_limits is not None and self._graphql_refused(body):
            return
        ledger = s.budgets
        if ledger is None or not ledger.active:
            self._connect()
            return
        # Bound the call's cost from its body and reserve it: inline (not a
        # helper's frame more), as this runs for every budgeted call
        target = self._target
        now = ledger.now()
        provider, model, cost, input_tokens, output_tokens, _ = worst_case_fields(
            self._provider_hint,
            target.host,
            target.path,
            body,
            self._body_bytes,  # all of it, when there is a body to bound
            now,
        )
        head = self._head
        context = head.context()
        # the call's scope: a CallScope's fields, as a plain tuple
        scope = (
            provider,
            model,
            context.customer_id,
            context.tenant_id,
            context.section_path or context.section,
            head.project,  # the project of the key the call came with
        )
        # the most input + output tokens, for tokens-per-minute limits
        tokens = (
            None if input_tokens is None or output_tokens is None else input_tokens + output_tokens
        )
        verdict = ledger.reserve(scope, cost, tokens, now)
        if not isinstance(verdict, BudgetHold):  # a budget's 402, a rate limit's 429
            if (
                type(verdict) is not BudgetRefusal
                or not verdict.may_grant  # the limit itself refused
                or verdict.worst_case_usd is None  # no price: a grant changes nothing
                or ledger.next_grants is None
                or ledger.outage
            ):
                self._refuse(verdict)
                return
            # refused only by this process's share of a shared budget (or by
            # the store's spend, read before a limit that may since have been
            # raised): the store may grant the room, so wait for the grant
            # exchange the refusal asked for and check once more before refusing. The
            # wait stands where a connection being made would: nothing else
            # connects the call meanwhile, and an abort cancels it.
            waited = ledger.next_grants()
            self._connecting = waited
            waited.addBoth(self._check_again, scope, cost, tokens)
            waited.addErrback(self._check_failed)
            return
        self._hold = verdict
        self._connect()

    def _check_again(
        self, result: object, scope: ScopeKey, cost: float | None, tokens: int | None
    ) -> None:
        """After a grant exchange (or its timeout): reserve the call again,
        and refuse it this time if it still does not fit."""
        self._connecting = None
        ledger = self._s.budgets
        if self.state is _ENDED or ledger is None:  # the client left meanwhile
            return
        if isinstance(result, Failure) and result.check(CancelledError):
            return  # aborted (the relay ends): not a timeout
        verdict = ledger.reserve(scope, cost, tokens)
        if not isinstance(verdict, BudgetHold):
            self._refuse(verdict)
            return
        # the event says why this call's overhead includes a grant's round trip
        verdict.flags += ("budget_waited",)
        self._hold = verdict
        self._connect()

    def _check_failed(self, failure: Failure) -> None:
        """The check after a grant exchange raised: answered, never left hanging."""
        _log.failure("budget check after a grant exchange failed", failure)
        if self.state is not _ENDED:
            self._fail_before_response(500, "internal_error", "internal error", Outcome.PROXY_ERROR)

    def _refuse(self, verdict: BudgetRefusal | RateRefusal) -> None:
        """Answer a budget's 402 or a rate limit's 429; the call goes nowhere."""
        if verdict.retry_after is not None:
            self._request.responseHeaders.setRawHeaders(
                b"Retry-After", [b"%d" % verdict.retry_after]
            )
        self._fail_before_response(
            verdict.status,
            verdict.kind,
            verdict.message(),
            Outcome.BUDGET_REFUSED,
            extra={verdict.detail_key: verdict.detail()},
        )

    def _graphql_refused(self, body: bytes | None) -> bool:
        """Refuse (400 graphql_limit) a GraphQL query over its host's limit."""
        limits = self._s.graphql_limits
        if limits is None:
            return False
        t = self._target
        limit = limits.for_target(t.host, t.port)
        if limit is None:
            return False
        ctype = next(
            (v for n, v in self._head.forward if n.lower() == b"content-type"), b""
        ).decode("latin-1")
        found = limits.refusal(
            limit,
            method=self._method.decode("latin-1"),
            path=t.path,
            query=t.query,
            content_type=ctype,
            body=body,
        )
        if found is None:
            return False
        message, figures = found
        self._fail_before_response(
            400, "graphql_limit", message, Outcome.REFUSED, extra={"graphql": figures}
        )
        return True

    def _connect(self, *, fresh: bool = False) -> None:
        resolved = self._resolved
        assert resolved is not None
        t = self._target
        key = (t.scheme, resolved.address, t.port, t.host)
        pool = self._s.pool
        if not fresh:
            idle = pool.take_idle(key)
            if idle is not None:
                self._connected(idle)
                return
        t_start = _now()
        try:
            d = pool.connect(key)
        except Exception as e:
            self._fail_before_response(502, "tls_error", str(e), Outcome.PROXY_ERROR)
            return
        self._connecting = d

        def connected(conn: UpstreamConnection) -> None:
            self._t_connect += _now() - t_start
            self._connected(conn)

        d.addCallbacks(connected, self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state is _ENDED:
            return
        if failure.check(CancelledError, ConnectingCancelledError):
            return
        if failure.check(ConnectTimeout):
            self._fail_before_response(
                504, "upstream_timeout", "connect timed out", Outcome.TIMEOUT
            )
            return
        kind = "tls_error" if "SSL" in repr(failure.value) else "upstream_unreachable"
        message = (
            f"cannot connect to {self._target.authority}"
            if failure.check(ConnectError)
            else f"{failure.getErrorMessage()}"
        )
        self._fail_before_response(502, kind, message, Outcome.PROXY_ERROR)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._connecting = None
        if self.state is _ENDED:
            conn.abort()
            return
        self._conn = conn
        conn.start(self, self._build_head(), self._method)
        self._t_sent = _now()
        self._arm("header", self._s.config.header_timeout)
        self._s.deadlines.add(self)
        pending, self._pending = self._pending, None
        if pending:
            for chunk in pending:
                self._send_chunk(conn, chunk)
            self._pending_size = 0
            self._unpause_client("connect")
        if self._body_done:
            self._send_body_end(conn)

    def _build_head(self) -> bytes:
        t = self._target
        head = self._head
        target = t.path.encode() + (b"?" + t.query.encode() if t.query else b"")
        parts = [self._method, b" ", target, b" HTTP/1.1\r\nHost: ", t.authority.encode(), b"\r\n"]
        usage = self._usage
        forward = head.forward if usage is None else usage.forward_headers(head.forward)
        for name, value in forward:
            parts += (name, b": ", value, b"\r\n")
        if head.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif usage is not None and usage.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % usage.content_length)
        elif head.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % head.content_length)
        if self._s.config.add_via:
            parts.append(b"Via: 1.1 llmobserve\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # Request body (from the client)

    def body_chunk(self, data: bytes) -> None:
        if self.state is _ENDED:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._s.config.max_body:
            self._fail_before_response(
                413,
                "body_too_large",
                f"request body over the {self._s.config.max_body}-byte limit",
                Outcome.REFUSED,
            )
            return
        self._req_tap.add(data)
        usage = self._usage
        if usage is not None and usage.holding:
            held = usage.hold(data)
            if held is not None:  # over the bound: forwarded unchanged
                self._release_held_body(held)
            return
        self._forward_body_chunk(data)

    def _forward_body_chunk(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            self._send_chunk(conn, data)
            if self.state is _BEFORE_RESPONSE:
                # The response-header deadline counts from the end of the request.
                self._arm("header", self._s.config.header_timeout)
            return
        assert self._pending is not None
        self._pending.append(data)
        self._pending_size += len(data)
        if self._gate:
            if self._pending_size > self._s.gate_buffer:
                self._pause_client("connect")
                self._check_budgets()  # too big to hold whole: no bound from the body
            return
        if self._pending_size > self._s.config.client_buffer:
            self._pause_client("connect")

    def body_complete(self) -> None:
        if self.state is _ENDED:
            return
        usage = self._usage
        if usage is not None and usage.holding:
            body = usage.finish()
            if body:
                self._forward_body_chunk(body)
                if self.state is _ENDED:  # refused on the way (the budgets saw it all)
                    return
            self._body_done = True
            if self._gate:  # the budgets see the whole body first
                self._check_budgets()
                return
            if self._resolved is not None and self._conn is None and self._connecting is None:
                self._connect()  # which ends the body: it is done
                return
        else:
            self._body_done = True
            if self._gate:
                if self._resolved is not None:  # else: once the target is checked
                    self._check_budgets()
                return
        conn = self._conn
        if conn is not None:
            self._send_body_end(conn)

    def _release_held_body(self, body: bytes) -> None:
        """The body C{--stream-usage} held (rewritten or not) goes the usual
        way; the connection waited for it when the target was checked first."""
        if body:
            self._forward_body_chunk(body)
        if self.state is _ENDED:  # refused on the way (the budgets saw it all)
            return
        if self._resolved is not None and self._conn is None and self._connecting is None:
            if self._gate:  # the budgets see the whole body first
                self._check_budgets()
            else:
                self._connect()

    def _send_chunk(self, conn: UpstreamConnection, data: bytes) -> None:
        if self._head.chunked:
            conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            conn.write(data)

    def _send_body_end(self, conn: UpstreamConnection) -> None:
        if self._head.chunked:
            conn.write(b"0\r\n\r\n")
        conn.request_finished()

    def _pause_client(self, why: str) -> None:
        if not self._client_paused_for:
            pause_client(self._request)
        self._client_paused_for.add(why)

    def _unpause_client(self, why: str) -> None:
        if why in self._client_paused_for:
            self._client_paused_for.discard(why)
            if not self._client_paused_for:
                resume_client(self._request)

    # Upstream events (IUpstreamListener)

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self._unpause_client("upstream")
        else:
            self._pause_client("upstream")

    def upstream_headers(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if self.state is _ENDED:
            return
        self._t_first = _now()
        s = self._s
        self._last_activity = clock_now = s.clock.seconds()
        self._status = status
        self._response_headers = tuple(headers)
        self.state = RELAY_TRANSITIONS.move(self.state, _RESPONDING)
        request = self._request
        request.setResponseCode(status, reason or None)
        out = request.responseHeaders
        forward, content_length = client_response_headers(headers)
        pairs = getattr(out, "pairs", None)
        if pairs is not None:  # the lean channel's headers: a plain list of pairs
            pairs += forward
        else:
            for name, value in forward:
                out.addRawHeader(name, value)
        if self._usage is not None:
            self._resp_filter = self._usage.response_filter(status, headers)
            if self._resp_filter is not None:
                content_length = None  # the body the client gets is shorter
        if content_length is not None and (
            self._method == b"HEAD" or status not in _NO_BODY_STATUS
        ):
            out.addRawHeader(b"Content-Length", content_length)
        hold = self._hold
        if hold is not None:
            remaining = hold.header
            if remaining is None:
                pass
            elif pairs is not None:
                pairs.append((_REMAINING_HEADER, remaining))
            else:
                out.addRawHeader(_REMAINING_HEADER, remaining)
        request.registerProducer(self, True)
        self._deadline_kind = "idle"  # _arm("idle"), with the clock read above
        self.deadline = clock_now + s.config.idle_timeout

    def upstream_body(self, data: bytes) -> None:
        if self.state is _ENDED:
            return
        self._last_activity = self._s.clock.seconds()
        self._response_bytes += len(data)
        self._resp_tap.add(data)
        if self._resp_filter is not None:
            data = self._resp_filter.feed(data)
            if not data:
                return
        self._request.write(data)

    def upstream_complete(self) -> None:
        if self.state is _ENDED:
            return
        self._t_upstream_done = _now()
        self._conn = None
        request = self._request
        if self._resp_filter is not None:
            rest = self._resp_filter.close()
            if rest:
                request.write(rest)
        request.unregisterProducer()
        status = self._status or 0
        if self._body_done:
            request.finish()
        else:
            # The upstream answered before the client finished its body:
            # end the response and close, ignoring the rest of the body.
            self._s.clock.callLater(0, finish_early, request)
        self._end(Outcome.UPSTREAM_ERROR if status >= 400 else Outcome.OK, None)

    def upstream_failed(self, kind: str, message: str) -> None:
        if self.state is _ENDED:
            return
        conn, self._conn = self._conn, None
        if self.state is _BEFORE_RESPONSE:
            if (
                kind == "upstream_reset"
                and conn is not None
                and conn.reused
                and not self._retried
                and self._method in _IDEMPOTENT
                and self._body_bytes == 0
                and self._head.content_length in (None, 0)
                and not self._head.chunked
            ):
                # A stale keep-alive connection: the request carried no body
                # and is idempotent, so one fresh attempt is safe.
                self._retried = True
                self._connect(fresh=True)
                return
            if kind == "timeout":
                self._fail_before_response(504, "upstream_timeout", message, Outcome.TIMEOUT)
            else:
                self._fail_before_response(
                    502,
                    kind,
                    message,
                    Outcome.PROXY_ERROR if kind != "upstream_reset" else Outcome.UPSTREAM_RESET,
                )
            return
        # Headers already went out: drop the client connection so a truncated
        # body can never look complete.
        self._t_upstream_done = _now()
        self._drop_client()
        self._end(Outcome.TIMEOUT if kind == "timeout" else Outcome.UPSTREAM_RESET, kind)

    # IPushProducer, registered on the client response

    def pauseProducing(self) -> None:
        """The client's socket is full: stop reading the upstream."""
        now = self._s.clock.seconds()
        self._paused_at = now
        self.deadline = min(self.deadline, now + self._s.config.client_write_timeout)
        conn = self._conn
        if conn is not None:
            conn.pause_reading()

    def resumeProducing(self) -> None:
        self._paused_at = None
        self._last_activity = self._s.clock.seconds()  # the upstream was quiet because of us
        conn = self._conn
        if conn is not None:
            conn.resume_reading()

    def stopProducing(self) -> None:
        """The client's transport is gone (twisted.web tells the producer first)."""
        self.client_gone()

    # Client gone

    def client_gone(self) -> None:
        """The client connection closed before the exchange ended.

        Mid-response, the client may well have had the whole body: a client
        that stops at the last SSE event closes at once, and its close can be
        seen before the upstream's end of message (its terminating chunk, in
        another segment, or behind the close in the same poll). So a relay
        that is not holding the upstream back waits up to
        L{CLIENT_CLOSE_GRACE} for that end: the response ends with no more
        body, and the call is C{ok}; one more body byte, an upstream failure
        or the grace running out, and it is C{client_aborted} and the
        upstream connection is cut at once.
        """
        state = self.state
        if state is _ENDED or state is _CLIENT_LEFT:
            return
        conn = self._conn
        if (
            conn is None
            or state is _BEFORE_RESPONSE
            or not self._body_done
            or self._paused_at is not None
        ):
            self._client_aborted()
            return
        self.state = RELAY_TRANSITIONS.move(state, _CLIENT_LEFT)
        self._s.deadlines.discard(self)
        self._client_left = self._s.clock.callLater(CLIENT_CLOSE_GRACE, self._client_aborted)
        conn.listener = _AfterClientLeft(self)

    def _client_aborted(self) -> None:
        left, self._client_left = self._client_left, None
        if left is not None and left.active():
            left.cancel()
        if self.state is _ENDED:
            return
        self._end(Outcome.CLIENT_ABORTED, "client_disconnected")
        self._abort_upstream()

    def _complete_after_client_left(self) -> None:
        """The upstream ended with no body byte the client did not get: a whole response."""
        left, self._client_left = self._client_left, None
        if left is not None and left.active():
            left.cancel()
        if self.state is _ENDED:
            return
        self._t_upstream_done = _now()
        self._conn = None
        status = self._status or 0
        self._end(Outcome.UPSTREAM_ERROR if status >= 400 else Outcome.OK, None)

    def _abort_upstream(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    # Timeouts

    def _arm(self, kind: str, seconds: float) -> None:
        self._deadline_kind = kind
        self.deadline = self._s.clock.seconds() + seconds

    def deadline_passed(self, now: float) -> None:
        """Called by the sweeper once C{now} is past C{deadline}."""
        if self.state is _ENDED:
            return
        if self._deadline_kind == "idle":
            paused = self._paused_at
            if paused is not None:
                # A client that stops reading holds two connections open: it
                # gets client_write_timeout, then both are dropped.
                if now - paused >= self._s.config.client_write_timeout:
                    self._client_too_slow()
                else:
                    self.deadline = paused + self._s.config.client_write_timeout
                return
            idle = self._s.config.idle_timeout
            if now - self._last_activity < idle:
                self.deadline = self._last_activity + idle
                return
            message = f"no upstream data for {idle:g}s"
        else:
            message = f"no response headers within {self._s.config.header_timeout:g}s"
        conn = self._conn
        self.upstream_failed("timeout", message)
        if conn is not None:
            conn.abort()

    def abort_for_shutdown(self) -> None:
        """The drain deadline passed: cut the exchange now and record it as
        C{shutdown_aborted}, with what the response carried so far (the
        body tap's copy: a cut stream is priced from its usage so far). The
        client loses its connection (a body already started can never look
        complete) or, before the response, gets a 503."""
        if self.state is _ENDED:
            return
        if self.state is not _BEFORE_RESPONSE:
            self._t_upstream_done = _now()
            self._drop_client()
            self._end(Outcome.SHUTDOWN_ABORTED, "drain_deadline")
            self._abort_upstream()
        else:
            self._fail_before_response(
                503, "shutting_down", "the proxy is shutting down", Outcome.SHUTDOWN_ABORTED
            )

    # Endings

    def _fail_before_response(
        self,
        status: int,
        kind: str,
        message: str,
        outcome: Outcome,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Answer with the proxy's own error; the client may still be sending."""
        self._abort_upstream()
        request = self._request
        self._status = status
        if not request.finished and not client_gone(request):
            if self._body_done:
                write_error(request, status, kind, message, extra)
            else:
                write_error_early(request, status, kind, message, self._s.clock, extra)
        self._end(outcome, kind)

    def _client_too_slow(self) -> None:
        self._abort_upstream()
        request = self._request
        request.unregisterProducer()
        channel: Any = request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # its buffer will never drain
        self._end(Outcome.TIMEOUT, "client_write_timeout")

    def _drop_client(self) -> None:
        request = self._request
        flush = getattr(request, "flush", None)
        if flush is not None:
            flush()  # what was relayed so far still reaches the client
        request.unregisterProducer()
        channel: Any = request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()

    def _end(self, outcome: Outcome, error: str | None) -> None:
        if self.state is _ENDED:
            return
        self.state = RELAY_TRANSITIONS.move(self.state, _ENDED)
        self._s.deadlines.discard(self)
        if self._client_paused_for:
            self._client_paused_for.clear()
            resume_client(self._request)
        s = self._s
        s.stats["in_flight"] -= 1
        now = _now()
        t_sent = self._t_sent
        t_done = self._t_upstream_done
        overhead = (t_sent - self._t0 - self._t_connect) if t_sent is not None else now - self._t0
        if t_done is not None:
            overhead += now - t_done
        t = self._target
        txn = Transaction(
            started_at=self._started_at,
            method=self._method.decode("latin-1"),
            scheme=t.scheme,
            host=t.host,
            port=t.port,
            path=t.path,
            query=t.query,
            request_headers=tuple(self._head.forward),
            context=self._head.context(),
            project=self._head.project,
            provider_hint=self._provider_hint,
            status=self._status,
            response_headers=self._response_headers,
            request_body=self._req_tap.value(),
            request_body_truncated=self._req_tap.truncated,
            response_body=self._resp_tap.value(),
            response_body_truncated=self._resp_tap.truncated,
            request_bytes=self._body_bytes,
            response_bytes=self._response_bytes,
            ttfb=None if self._t_first is None else self._t_first - self._t0,
            duration=now - self._t0,
            overhead=max(overhead, 0.0),
            outcome=outcome,
            error=error,
            budget_hold=self._hold,
        )
        try:
            s.sink.transaction_finished(txn)
        except Exception:
            _log.failure("transaction sink raised")


class _AfterClientLeft:
    """The upstream listener of a relay whose client closed mid-response.

    Only the end of the message, with nothing more to relay, completes the
    call; anything else means the client did not get the whole response.
    """

    __slots__ = ("_relay",)

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def upstream_headers(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._relay._client_aborted()

    def upstream_body(self, data: bytes) -> None:
        self._relay._client_aborted()

    def upstream_complete(self) -> None:
        self._relay._complete_after_client_left()

    def upstream_failed(self, kind: str, message: str) -> None:
        self._relay._client_aborted()

    def upstream_writable(self, writable: bool) -> None:
        pass


def _refusal_outcome(status: int) -> Outcome:
    """A target the policy turned down (4xx) is C{refused}; one it could not
    check (502: no address) is a C{proxy_error}. Neither went upstream."""
    return Outcome.REFUSED if status < 500 else Outcome.PROXY_ERROR


def write_error_early(
    request: Request,
    status: int,
    kind: str,
    message: str,
    clock: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    """An error while the request body may still be arriving: answer, then close.

    Deferred to the next reactor turn so that nothing is written while
    twisted.web is still inside its header handling (it may yet send
    C{100 Continue}).
    """
    clock.callLater(0, _answer_and_close, request, status, kind, message, extra)


def _answer_and_close(
    request: Request, status: int, kind: str, message: str, extra: dict[str, Any] | None
) -> None:
    if request.finished or client_gone(request):
        return
    body = prepare_error(request, status, kind, message, extra)
    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    request.write(body)
    finish_early(request)
