"""The event path behind the proxy: parse pool, event record, spool, delivery.

L{make_event_sink} is what C{llmobserve.proxy._tap} calls. The sink it
returns (an L{EventPipeline}) takes each finished L{Transaction} on the
reactor thread, hands it to a bounded parse pool (or, when the pool is full,
records it unparsed at once), appends the resulting event to the on-disk
spool, and lets the delivery take it from there: the collector link, or in
embedded mode a writer thread into a local SQLite C{EventStore}.

Traffic is never delayed by observation: no method here blocks, waits or
raises; the reactor-side cost of one exchange is a counter, a thread-pool
hand-off and, when the parse comes back, one C{write(2)} to the spool.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import hyperlink
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmobserve.events._embedded import EmbeddedWriter, StoreLike
from llmobserve.events._exchange import AnalyseFn, default_analyse, exchange_from_transaction
from llmobserve.events._link import CollectorLink, retry_policy
from llmobserve.events._orphans import OrphanSpools
from llmobserve.events._outbox import Outbox, Record
from llmobserve.events._pool import DaemonThreadPool, ParsePool
from llmobserve.events._record import (
    UsageLike,
    build_call_event,
    build_gap_event,
    build_span_event,
    new_event_id,
    pack_event,
)
from llmobserve.events._spool import EventSpool, SpoolLocked
from llmobserve.events._turns import ReactorTurns
from llmobserve.events._waiters import Waiters, after
from llmobserve.money import usd_fixed
from llmobserve.transaction import ITransactionSink, Transaction
from parsers.registry import REGISTRY

__all__ = ["EventPipeline", "make_event_sink", "open_spool", "parse_collector_url"]

_MAX_EVENT_BYTES: Final = 64 * 1024
_MAX_SPANS_PER_POST: Final = 10_000

#: Parsing time after which a parse thread pauses until the reactor's next
#: turn (L{ReactorTurns.pause}), while parsing keeps up (see
#: C{_yield_backlog}); about the longest a reactor woken mid-slice waits for
#: the GIL. Traced at c=1: 200 us slices with C{os.sched_yield} between them
#: cost a request that met a batch ~400 us, as the thread came back at each
#: of the reactor's system calls. With pauses for the reactor's turn, each
#: pause costs a wake-up at the reactor's next turn, a context switch and
#: cold caches: on the slower machine 100 us slices (a pause every second
#: chat event) made the event path ~25% dearer than 500 us ones
#: (C{bench.event_path}: ~133 against ~110 us per event), and on a busy
#: host 500 us gave a lower c=1 added p50 (median 2.6x the floor's against
#: 4.8x over ten interleaved pairs). But on the quiet host, with everything
#: of session 7 merged, 500 us left the c=1 p50 where it was (+188 against
#: +195 us) and put the c=1 p99 at +3.6 ms against +0.9 ms (the reactor
#: waits out the GIL behind a longer slice): 100 us it stays
#: (docs/BENCHMARKS.md, session 7). Never pausing under a backlog keeps c=64
#: parsed.
_SLICE: Final = 0.0001

Delivery = CollectorLink | EmbeddedWriter
#: a parsed exchange: (spool seq or None when full, packed event, parse failed,
#: the store row made ahead or None)
_Parsed = tuple[int | None, bytes, bool, Any]


@implementer(ITransactionSink)
class EventPipeline(Service):
    """The L{ITransactionSink} that turns exchanges into delivered events.

    Counters are plain ints touched on the reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        spool: EventSpool,
        outbox: Outbox,
        delivery: Delivery,
        mode: str,
        analyse: AnalyseFn,
        parse_workers: int = 2,
        parse_queue: int = 1000,
        parse_gather: float = 0.0,
        flush_interval: float = 0.05,
        flush_records: int = 1024,
        parse_drain_timeout: float = 2.0,
        ack_drain_timeout: float = 2.0,
        log_events: bool = True,
        log_lines_per_second: int = 50,
        turns: ReactorTurns | None = None,
        orphans: OrphanSpools | None = None,
        adopt_interval: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.spool = spool
        self.outbox = outbox
        self.delivery = delivery
        self.mode = mode
        self.pool: ParsePool[tuple[int, Transaction], _Parsed] = ParsePool(
            reactor,
            self._parse_batch,
            self._parsed_batch,
            self._batch_failed,
            workers=parse_workers,
            queue=parse_queue,
            gather=parse_gather,
        )
        self._analyse = analyse
        # Parsing keeps up while fewer than this many exchanges wait: then a
        # parse thread yields to the reactor after each one. Past it, the
        # reactor would starve the parse threads (at saturation it always
        # wants the GIL) and the queue would fill up with unparsed exchanges.
        self._yield_backlog = self.pool.limit // 4
        self._turns = turns if turns is not None else ReactorTurns(reactor)
        self.proxy_id = spool.proxy_id
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        self.parse_drain_timeout = parse_drain_timeout
        self.ack_drain_timeout = ack_drain_timeout
        self.log_events = log_events
        self._log_quota = _LineQuota(log_lines_per_second)
        # counters (reactor thread only)
        self.calls_total = 0
        self.not_forwarded_total = 0  # of calls_total: the proxy refused or could not forward
        self.events_total = 0
        self.events_dropped_total = 0
        self.parse_skipped_total = 0
        self.parse_errors_total = 0
        # priced calls and their cost, added by the parse threads (the shutdown line)
        self.priced = PricedTally()
        self._acked_at_start = spool.acked_seq
        # state
        self._gap_pending = 0
        self._lost_pending = 0  # lost with removed segment files, not yet in a gap record
        self._closed_drops = 0  # events that came after the spool closed
        self._recreated_seen = 0
        self._spool_error: str | None = None  # the spool's error, as last logged
        # exchanges handed to the pool and not yet appended; a worker claims its
        # own under the lock before appending, the drain deadline claims the rest
        self._parsing: dict[int, Transaction] = {}
        # parsed, not spooled: (payload, parse failed, log line, low priority, row)
        self._ready: dict[int, tuple[bytes, bool, str, bool, Any]] = {}
        self._parsing_lock = threading.Lock()
        self._next_token = 0
        self._unsynced = 0
        self._sync_call: IDelayedCall | None = None
        self._pump_call: IDelayedCall | None = None
        self._sync_busy: Deferred[None] | None = None
        self._ack_waiters = Waiters(reactor)
        # (budget hold, cost, outcome, status, usage) of priced calls, appended by the
        # parse threads, settled on the reactor when their batch comes back
        self._settlements: deque[tuple[Any, Any, str, int | None, Any]] = deque()
        self._io = DaemonThreadPool(minthreads=1, maxthreads=1, name="llmobserve-spool")
        self.orphans = orphans
        self.adopt_interval = adopt_interval
        self._adopt_call: IDelayedCall | None = None
        outbox.on_acked = self._acked
        outbox.read_after = self.read_spool
        if isinstance(delivery, EmbeddedWriter):
            delivery.on_replaced = self._store_replaced

    # -- ITransactionSink -------------------------------------------------------

    def transaction_finished(self, transaction: Transaction) -> None:
        """Hand one exchange to the parse pool, or record it unparsed now."""
        try:
            self.calls_total += 1
            if transaction.outcome in _NOT_FORWARDED:
                self.not_forwarded_total += 1
            token = self._next_token
            self._next_token = token + 1
            with self._parsing_lock:
                self._parsing[token] = transaction
            if not self.pool.try_submit((token, transaction)):
                with self._parsing_lock:
                    del self._parsing[token]
                self.parse_skipped_total += 1
                self._append(
                    self._unparsed(transaction, "parse_skipped"),
                    low=transaction.provider_hint is None and not is_known_host(transaction.host),
                )
        except Exception:
            self._log.failure("event sink failed on a transaction")

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        """Turn SDK spans into C{kind: span} events on the same spool and link."""
        try:
            now = time.time()
            for span in list(spans)[:_MAX_SPANS_PER_POST]:
                if not isinstance(span, Mapping):
                    continue
                event = build_span_event(span, event_id=new_event_id(now), proxy_id=self.proxy_id)
                self._append(pack_event(event), low=True)
        except Exception:
            self._log.failure("event sink failed on spans")

    @property
    def store_path(self) -> str | None:
        """The embedded store's file; None when events go to a collector."""
        return self.delivery.url if isinstance(self.delivery, EmbeddedWriter) else None

    def health(self) -> Mapping[str, Any]:
        """C{collector} (mode, state, url; in link mode also urls, every
        collector named) and C{events_waiting}; while
        events cannot be kept or stored, also C{status: degraded} and the
        reasons (C{degraded}, a list of sentences)."""
        body: dict[str, Any] = {
            "collector": {
                "mode": self.mode,
                "state": self.delivery.state,
                "url": self.delivery.url,
                # why the collector refused the link (e.g. unauthorized)
                "refused": getattr(self.delivery, "refused", None),
            },
            "events_waiting": self.outbox.waiting,
        }
        if isinstance(self.delivery, CollectorLink):
            body["collector"]["urls"] = list(self.delivery.urls)
        orphans = self.orphans
        if orphans is not None and (orphans.held or orphans.adopted_total):
            body["events_waiting"] += orphans.waiting
            body["orphaned_spools"] = {
                "held": len(orphans.held),
                "events_waiting": orphans.waiting,
                "events_adopted": orphans.adopted_total,
            }
        if isinstance(self.delivery, EmbeddedWriter) and self.delivery.replaced_total:
            body["collector"]["store_reopened"] = {
                "times": self.delivery.replaced_total,
                "events_sent_again": self.delivery.redelivered_total,
            }
        problems = self.problems()
        if problems:
            body["status"] = "degraded"
            body["degraded"] = problems
        return body

    def problems(self) -> list[str]:
        """Why events are not being kept or stored right now (empty when
        all is well). A collector that is away is not one: the spool keeps
        its events, and they go when it is back; one that refuses this
        proxy's key is (they never go until the key is fixed)."""
        out: list[str] = []
        if self.spool.error is not None:
            out.append(self.spool.error)
        if getattr(self.delivery, "refused", None) == "unauthorized":
            # kept in the spool, but never stored until someone fixes the key
            # (key_check_unavailable, the collector's key store unreadable for
            # a while, is not: the link is tried again as after an outage)
            out.append(
                "the collector refuses this proxy's link (unauthorized): events wait in"
                " the spool until it has a valid --collector-key"
            )
        if isinstance(self.delivery, EmbeddedWriter) and self.delivery.error is not None:
            out.append(self.delivery.error)
        if self._gap_pending or self._lost_pending:
            n = self._gap_pending + self._lost_pending
            out.append(f"{n} events dropped or lost; their gap record is not written yet")
        return out

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        """Samples for C{GET /metrics}."""
        return [
            (
                "llmobserve_events_total",
                "counter",
                "Events created (calls and spans)",
                self.events_total,
            ),
            (
                "llmobserve_events_dropped_total",
                "counter",
                "Events dropped because the spool was full (each counted in a gap record)",
                self.events_dropped_total,
            ),
            (
                "llmobserve_parse_skipped_total",
                "counter",
                "Exchanges recorded unparsed because the parse queue was full",
                self.parse_skipped_total,
            ),
            (
                "llmobserve_parse_errors_total",
                "counter",
                "Events whose parsing failed (parse_error set)",
                self.parse_errors_total,
            ),
            (
                "llmobserve_link_reconnects_total",
                "counter",
                "Collector connection attempts after the first",
                self.delivery.reconnects,
            ),
            (
                "llmobserve_spool_bytes",
                "gauge",
                "Bytes in spool segments on disk",
                self.spool.total_bytes,
            ),
            (
                "llmobserve_events_waiting",
                "gauge",
                "Events spooled but not acknowledged",
                self.outbox.waiting,
            ),
            (
                "llmobserve_spool_torn_records_total",
                "counter",
                "Torn or corrupt spool records skipped",
                self.spool.torn_total,
            ),
            (
                "llmobserve_spool_lost_records_total",
                "counter",
                "Spooled events lost with segment files removed under the spool "
                "(each counted in a gap record)",
                self.spool.lost_total,
            ),
            (
                "llmobserve_collector_connected",
                "gauge",
                "1 when events are being delivered",
                float(self.delivery.connected),
            ),
            (
                "llmobserve_parse_queue",
                "gauge",
                "Exchanges waiting for or in a parse thread",
                self.pool.in_flight,
            ),
            (
                "llmobserve_parse_queue_limit",
                "gauge",
                "The parse queue's cap: past it, calls are recorded unparsed",
                self.pool.limit,
            ),
        ]

    # -- the worker thread ----------------------------------------------------

    def _parse_batch(self, items: list[tuple[int, Transaction]]) -> list[_Parsed]:
        """A pool thread's job: every exchange submitted in one reactor turn.

        Each exchange is parsed and moved from C{_parsing} to C{_ready};
        then the whole batch is spooled with one write, here and not on the
        reactor (a blocking C{write(2)} there would wait for the GIL behind
        the parse threads). Spooling last means a slow parse never holds
        seqs that other events wait behind. At the drain deadline the
        reactor takes over whatever is still in either map. After each
        C{_SLICE} of parsing the thread waits for the reactor's next turn
        (L{ReactorTurns.pause}) so that the reactor never waits for a whole
        batch, unless a backlog says parsing falls behind.
        """
        lines_left = self._log_quota.take(len(items)) if self.log_events else 0
        row_for = self.delivery.row_for
        unlogged: list[Any] = []  # the costs of the calls over the line quota
        priced, cost = 0, 0.0
        slice_start = time.perf_counter()
        for token, txn in items:
            payload, had_error, event = self._parse(txn)
            call_cost = event.get("cost_usd")
            if txn.budget_hold is not None:  # settled on the reactor (_parsed_batch)
                self._settlements.append(
                    (txn.budget_hold, call_cost, txn.outcome, txn.status, event.get("usage"))
                )
            if type(call_cost) is float:
                priced += 1
                cost += call_cost
            row = None
            if row_for is not None:
                try:  # the embedded store's row, made here rather than in its thread
                    row = row_for(event)
                except Exception:
                    pass  # the store thread makes it from the payload
            line = ""
            if lines_left:
                lines_left -= 1
                try:  # now, while the event is fresh in the CPU's caches
                    line = _summary(event)
                except Exception:
                    pass  # logging never costs an event
            elif self.log_events:
                unlogged.append(event.get("cost_usd"))
            with self._parsing_lock:
                if self._parsing.pop(token, None) is not None:
                    self._ready[token] = (payload, had_error, line, is_low_priority(event), row)
            if self.pool.in_flight <= self._yield_backlog:  # a racy read is fine here
                if time.perf_counter() - slice_start >= _SLICE:
                    self._turns.pause()
                    slice_start = time.perf_counter()
        if unlogged:
            self._log_quota.skipped(unlogged)
        if priced:
            self.priced.add(priced, cost)
        with self._parsing_lock:
            mine = [self._ready.pop(t) for t, _ in items if t in self._ready]
        seqs = self._spool_append_many([m[0] for m in mine], low=[m[3] for m in mine])
        lines = [m[2] for m in mine if m[2]]
        over = self._log_quota.summary()
        if over:
            lines.append(over)
        if lines:
            try:
                # one log event per batch: a twisted.logger event costs tens
                # of microseconds, far more than a line of text
                self._log.info("{calls}", calls="\n".join(lines))
            except Exception:
                pass  # logging never costs an event
        return [
            (seq, payload, had_error, row)
            for seq, (payload, had_error, _, _, row) in zip(seqs, mine, strict=True)
        ]

    def _parse(self, txn: Transaction) -> tuple[bytes, bool, dict[str, Any]]:
        """Parse, price and pack one exchange: (payload, parse failed, event)."""
        parse_error: str | None = None
        usage: UsageLike | None = None
        try:
            usage = self._analyse(exchange_from_transaction(txn))
        except Exception as e:  # analyse is meant to be total; never lose the event
            parse_error = f"{type(e).__name__}: {e}"
        try:
            event = build_call_event(
                txn,
                usage,
                event_id=new_event_id(txn.started_at),
                proxy_id=self.proxy_id,
                parse_error=parse_error,
                flags=budget_flags(txn),
            )
            payload = self._pack(event)
        except Exception as e:  # a record the event cannot hold: keep the exchange
            event = self._unparsed_event(txn, "event_build_failed", f"{type(e).__name__}: {e}")
            payload = self._pack(event)
        return payload, event["parse_error"] is not None, event

    def _spool_append_many(
        self, payloads: list[bytes], force: bool = False, low: list[bool] | None = None
    ) -> list[int | None]:
        if not payloads:
            return []
        if self.spool.closed:
            # an exchange that ended after the sink stopped (the drain
            # deadline cuts every call before that: this is a last resort)
            if not self._closed_drops:
                self._log.warn("event sink stopped: events of calls ending now are lost")
            self._closed_drops += len(payloads)
            return [None] * len(payloads)
        try:
            return self.spool.append_many(payloads, force=force, low=low)
        except Exception:
            self._log.failure("spool append failed")
            return [None] * len(payloads)

    def _spool_append(self, payload: bytes, force: bool = False, low: bool = False) -> int | None:
        return self._spool_append_many([payload], force, [low])[0]

    @staticmethod
    def _pack(event: dict[str, Any]) -> bytes:
        payload = pack_event(event)
        if len(payload) > _MAX_EVENT_BYTES:
            event["graphql"] = None
            event["context"] = {}
            event["flags"] = [*event["flags"][:8], "event_truncated"]
            payload = pack_event(event)
        return payload

    # -- back on the reactor -------------------------------------------------

    def _parsed_batch(self, results: list[_Parsed]) -> None:
        settlements = self._settlements
        while settlements:
            hold, cost, outcome, status, usage = settlements.popleft()
            hold.settle(cost if type(cost) is float else None, outcome, status, usage)
        hold_row = self.delivery.hold_row
        for seq, _payload, had_error, row in results:
            if had_error:
                self.parse_errors_total += 1
            if row is not None and seq is not None:
                hold_row(seq, row)
        self.events_total += len(results)
        self._spooled([(seq, payload) for seq, payload, _, _ in results])
        self.delivery.pump()

    def _batch_failed(self, items: list[tuple[int, Transaction]], failure: Failure) -> None:
        self._log.failure("a parse batch failed", failure)
        why = f"{type(failure.value).__name__}: {failure.value}"
        for token, txn in items:
            with self._parsing_lock:
                found = self._parsing.pop(token, None) or self._ready.pop(token, None)
            if found is not None:
                self.parse_errors_total += 1
                self._append(self._unparsed(txn, "event_build_failed", why))

    def _unparsed_event(
        self, txn: Transaction, flag: str, parse_error: str | None = None
    ) -> dict[str, Any]:
        return build_call_event(
            txn,
            None,
            event_id=new_event_id(txn.started_at),
            proxy_id=self.proxy_id,
            parse_error=parse_error,
            flags=(flag, *budget_flags(txn)),
        )

    def _unparsed(self, txn: Transaction, flag: str, parse_error: str | None = None) -> bytes:
        if txn.budget_hold is not None:  # no price: the hold says what counts as spent
            txn.budget_hold.settle(None, txn.outcome, txn.status)
        return self._pack(self._unparsed_event(txn, flag, parse_error))

    def _append(self, payload: bytes, low: bool = False) -> None:
        """Spool an event built on the reactor (the rare paths: a full parse
        queue, spans, the drain deadline); they are sent at the next turn,
        together with whatever else arrived in this one."""
        self.events_total += 1
        self._spooled([(self._spool_append(payload, low=low), payload)])
        if self._pump_call is None:
            self._pump_call = self._clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        self.delivery.pump()

    def _spooled(self, records: Sequence[tuple[int | None, bytes]]) -> None:
        """Offer appended records to the outbox and count the ones the full
        spool dropped (seq None); the gap check and the fsync bookkeeping
        run once for all of them."""
        if self.spool.error != self._spool_error:
            self._spool_error = self.spool.error
            if self._spool_error is not None:
                self._log.warn(
                    "{error}: events are dropped and counted until it can write again",
                    error=self._spool_error,
                )
            else:
                self._log.info("the spool can write again")
        spooled = 0
        offer = self.outbox.offer
        for seq, payload in records:
            if seq is None:
                self.events_dropped_total += 1
                self._gap_pending += 1
                continue
            offer(seq, payload)
            spooled += 1
        if spooled:
            if (self._gap_pending or self._lost_pending) and self.spool.has_room(256):
                self._write_gap()
            self._dirty(spooled)

    def _write_gap(self) -> None:
        """Record how many events the full spool dropped, and how many were
        lost with removed segment files, in gap records (written over the
        cap: they are tiny). A count stays pending until its record is
        spooled."""
        if self._gap_pending and self._spool_gap(self._gap_pending, "spool_full"):
            self._log.warn(
                "spool full: {n} events dropped (gap record written)", n=self._gap_pending
            )
            self._gap_pending = 0
        if self._lost_pending and self._spool_gap(self._lost_pending, "spool_files_lost"):
            self._log.warn(
                "{n} spooled events lost with their removed segment files (gap record written)",
                n=self._lost_pending,
            )
            self._lost_pending = 0

    def _spool_gap(self, n: int, flag: str) -> bool:
        event = build_gap_event(n, event_id=new_event_id(), proxy_id=self.proxy_id, ts=time.time())
        event["flags"] = [flag]
        payload = pack_event(event)
        seq = self._spool_append(payload, force=True)
        if seq is None:
            return False
        self.outbox.offer(seq, payload)
        self._dirty()
        self.delivery.pump()
        return True

    def _store_replaced(self) -> int:
        """The embedded store's file was removed: send again everything the
        spool still holds; return how many of those the lost file had."""
        before = self.outbox.acked_seq
        after = self.spool.rewind_ack()
        self.outbox.replay(after)
        self._dirty(count=0)
        return max(0, before - after)

    def _acked(self, seq: int) -> None:
        self.spool.ack(seq)
        self._dirty(count=0)
        if self._ack_waiters and self.outbox.waiting == 0:
            self._ack_waiters.fire()

    # -- fsync in batches -----------------------------------------------------

    def _dirty(self, count: int = 1) -> None:
        self._unsynced += count
        if self._sync_busy is not None:
            return
        if self._unsynced >= self.flush_records:
            self._sync_now()
        elif self._sync_call is None and self.running:
            self._sync_call = self._clock.callLater(self.flush_interval, self._sync_now)

    def _sync_now(self) -> Deferred[None]:
        """fsync the spool (and delete acked segments) in the spool thread."""
        if self._sync_call is not None:
            if self._sync_call.active():
                self._sync_call.cancel()
            self._sync_call = None
        if self._sync_busy is not None:
            return after(self._sync_busy)
        if (self._gap_pending or self._lost_pending) and self.spool.has_room(256):
            self._write_gap()
        self._unsynced = 0
        d: Deferred[None] = deferToThreadPool(self._reactor, self._io, self.spool.sync)
        self._sync_busy = d

        def done(result: object) -> None:
            self._sync_busy = None
            if isinstance(result, Failure):
                self._log.failure("spool fsync failed", result)
            if self.spool.recreated_total != self._recreated_seen:
                self._recreated_seen = self.spool.recreated_total
                self._log.warn(
                    "spool directory {dir} was removed: recreated; events of the removed "
                    "segments that were not delivered yet are counted in a gap record",
                    dir=str(self.spool.directory),
                )
            pending = self._gap_pending or self._lost_pending
            if (self._unsynced or self.spool.needs_sync or pending) and self.running:
                self._sync_call = self._clock.callLater(self.flush_interval, self._sync_now)

        d.addBoth(done)
        return after(d)

    def read_spool(
        self, after_seq: int, max_records: int, max_bytes: int
    ) -> Deferred[tuple[list[Record], int]]:
        """The outbox's disk reads, in the spool thread. Records found lost
        (their segment file removed) are counted for a gap record."""
        d: Deferred[tuple[list[Record], int]] = deferToThreadPool(
            self._reactor, self._io, self.spool.read, after_seq, max_records, max_bytes
        )
        d.addCallback(self._after_read)
        return d

    def _after_read(self, result: tuple[list[Record], int]) -> tuple[list[Record], int]:
        lost = self.spool.take_lost()
        if lost:
            self._lost_pending += lost
            # after the outbox took this read (the gap record's seq is new)
            self._clock.callLater(0, self._write_gap)
        return result

    # -- orphaned sub-spools --------------------------------------------------

    def _adopt(self) -> None:
        """Look for orphaned sub-spools, or move one batch of a held one
        (in the spool thread); again at once while one is held, else after
        C{adopt_interval}."""
        self._adopt_call = None
        if not self.running or self.orphans is None:
            return
        d = deferToThreadPool(self._reactor, self._io, self._adopt_step, self.orphans)
        d.addCallbacks(self._adopted, self._adopt_failed)

    @staticmethod
    def _adopt_step(
        orphans: OrphanSpools,
    ) -> tuple[list[Path], list[tuple[int, bytes]], list[tuple[Path, int]]]:
        taken = [] if orphans.held else orphans.scan()
        moved, released = orphans.step()
        return taken, moved, released

    def _adopted(
        self, result: tuple[list[Path], list[tuple[int, bytes]], list[tuple[Path, int]]]
    ) -> None:
        taken, moved, released = result
        for directory in taken:
            self._log.warn(
                "adopting the spool {dir}: no live process holds it; its events are "
                "delivered from here",
                dir=str(directory),
            )
        if moved:
            self._spooled(moved)
            self.delivery.pump()
        for directory, n in released:
            self._log.info("adopted {n} events from the spool {dir}", n=n, dir=str(directory))
        self._next_adopt()

    def _adopt_failed(self, failure: Failure) -> None:
        self._log.failure("adopting an orphaned spool failed", failure)
        self._next_adopt(failed=True)

    def _next_adopt(self, failed: bool = False) -> None:
        if not self.running or self.orphans is None:
            return
        soon = self.orphans.held and not failed
        self._adopt_call = self._clock.callLater(0 if soon else self.adopt_interval, self._adopt)

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        self._turns.install()
        self._io.start()
        self.pool.start()
        stats = self.spool.stats
        self._log.info(
            "event spool {dir}: {waiting} events waiting, {segments} segments, "
            "{torn} torn records skipped",
            dir=str(self.spool.directory),
            waiting=self.spool.waiting,
            segments=stats.segments,
            torn=stats.torn,
        )
        self.delivery.startService()
        if self.orphans is not None:
            self._adopt_call = self._clock.callLater(0, self._adopt)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        """Drain: in-flight parses (bounded), fsync, acks (bounded), close."""
        super().stopService()  # type: ignore[no-untyped-call]  # twisted's Service is unannotated
        idle = yield self.pool.wait_idle(self.parse_drain_timeout)
        if not idle:
            with self._parsing_lock:
                stuck, self._parsing = self._parsing, {}
                ready, self._ready = self._ready, {}
            self._log.warn("{n} parses still running at the drain deadline", n=len(stuck))
            for payload, had_error, _line, low, row in ready.values():
                seq = self._spool_append(payload, low=low)
                self._parsed_batch([(seq, payload, had_error, row)])
            for txn in stuck.values():
                self.parse_skipped_total += 1
                self._append(self._unparsed(txn, "parse_timeout"))
        self.pool.stop()
        if self._gap_pending or self._lost_pending:
            self._write_gap()
        yield self._flush()
        if self.outbox.waiting and self.delivery.state != "down":
            yield self._wait_acked(self.ack_drain_timeout)
        yield self.delivery.stopService()
        yield self._flush()
        for call in (self._pump_call, self._sync_call, self._adopt_call):
            if call is not None and call.active():
                call.cancel()
        self._pump_call = self._sync_call = self._adopt_call = None
        self._io.stop()
        if self.orphans is not None:
            self.orphans.release()
        self._turns.uninstall()
        delivered = self.spool.acked_seq - self._acked_at_start
        self.spool.close()
        self._log.info("{summary}", summary=self.stop_summary(delivered))

    def stop_summary(self, delivered: int) -> str:
        """The shutdown line: what this run recorded and where its events are."""
        priced, cost = self.priced.read()
        # as the report: calls the proxy did not forward are counted apart
        refused = self.not_forwarded_total
        calls = self.calls_total - refused
        unpriced = max(0, calls - priced)
        apart = f", {refused} refused or not forwarded" if refused else ""
        return (
            f"llmobserve proxy stopped: {calls} call{'' if calls == 1 else 's'}, "
            f"${usd_fixed(round(cost, 8))} priced, {unpriced} unpriced{apart}; "
            f"events: {delivered} delivered to the {_DELIVERED_TO.get(self.mode, self.mode)}, "
            f"{self.outbox.waiting} waiting in the spool for the next start"
        )

    @inlineCallbacks
    def _flush(self) -> Generator[Deferred[Any], Any, None]:
        """Wait out a running sync, then sync everything appended so far."""
        while self._sync_busy is not None:
            yield after(self._sync_busy)
        yield self._sync_now()

    def _wait_acked(self, timeout: float) -> Deferred[bool]:
        if self.outbox.waiting == 0:
            return succeed(True)
        return self._ack_waiters.wait(timeout)


def budget_flags(txn: Transaction) -> tuple[str, ...]:
    """The flags a call's budget check left for its event (none without a hold)."""
    hold = txn.budget_hold
    return () if hold is None else tuple(hold.flags)


def is_low_priority(event: Mapping[str, Any]) -> bool:
    """Class 1 (dropped first from a full spool): spans, and calls to hosts
    no parser knows. Class 0 is every call to a known provider: the money."""
    return event.get("kind") == "span" or event.get("provider") in (None, "unknown")


def is_known_host(host: str) -> bool:
    """Does a parser know this host (a call to it is class 0, parsed or not)?"""
    return REGISTRY.for_host(host) is not None


class _LineQuota:
    """At most C{per_second} per-call log lines a second, shared by the parse
    threads; the calls over it are summed up in one line per second instead
    (a line per call costs ~3.5 us of the event path, and 10,000 lines a
    second help nobody)."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window_end = 0.0
        self._left = 0
        self._skipped = 0
        self._skipped_cost = 0.0
        self._report = ""

    def take(self, wanted: int) -> int:
        """How many of C{wanted} calls may have their own line now."""
        now = time.monotonic()
        with self._lock:
            if now >= self._window_end:
                if self._skipped:
                    self._report = (
                        f"... and {self._skipped} more calls (cost={self._skipped_cost:.6f})"
                        " not logged one by one"
                    )
                self._window_end = now + 1.0
                self._left = self.per_second
                self._skipped = 0
                self._skipped_cost = 0.0
            granted = min(wanted, self._left)
            self._left -= granted
            return granted

    def skipped(self, costs: Sequence[Any]) -> None:
        """Count calls that had no line of their own (with their costs)."""
        total = sum(cost for cost in costs if type(cost) is float)
        with self._lock:
            self._skipped += len(costs)
            self._skipped_cost += total

    def summary(self) -> str:
        """The line for the calls skipped in the last window, once."""
        with self._lock:
            report, self._report = self._report, ""
            return report


_DELIVERED_TO: Final = {"embedded": "embedded store", "link": "collector"}


class PricedTally:
    """Priced calls and their summed cost, added by the parse threads once per batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._cost = 0.0

    def add(self, calls: int, cost: float) -> None:
        with self._lock:
            self._calls += calls
            self._cost += cost

    def read(self) -> tuple[int, float]:
        """(priced calls, their cost in USD) so far."""
        with self._lock:
            return self._calls, self._cost


def _cost_text(cost: Any) -> str:
    return usd_fixed(cost) if isinstance(cost, float | int) else "unpriced"


#: Outcomes of calls the proxy never forwarded (the report's NOT_FORWARDED: a
#: budget's or a rate limit's refusal too): no usage or cost to show, and the
#: stop line counts them apart from the calls.
_NOT_FORWARDED = frozenset({"refused", "proxy_error", "budget_refused"})


def _summary(event: Mapping[str, Any]) -> str:
    """The log line of one call event.

    A call the proxy did not forward says why (its C{error:} flag) instead
    of a provider, model and usage it never had.
    """
    usage = event["usage"]
    if event["outcome"] in _NOT_FORWARDED:
        why = [f[len("error:") :] for f in event.get("flags", ()) if f.startswith("error:")]
        return (
            f"{event['method']} {event['host']}{event['path']} -> {event['status']} "
            f"{event['outcome']} ({', '.join(why) or 'no reason given'}), not forwarded "
            f"ms={event['duration_ms']}"
        )
    return (
        f"{event['method']} {event['host']}{event['path']} -> {event['status']} "
        f"{event['outcome']} {event['provider']} {event['model']} "
        f"in={usage.get('input_tokens')} out={usage.get('output_tokens')} "
        f"cost={_cost_text(event['cost_usd'])} ms={event['duration_ms']}"
    )


# -- construction -------------------------------------------------------------


def parse_collector_url(url: str) -> tuple[str, int]:
    """C{http://host:port}, C{https://host:port} (or C{host:port}) to the TCP
    address of the link.

    The scheme names the port and whether the link speaks TLS: the link
    goes to the collector's single port, plain or (https) inside TLS, whose
    endpoint the caller makes (L{make_event_sink}'s C{endpoint}).
    """
    text = url if "://" in url else f"http://{url}"
    parsed = hyperlink.URL.from_text(text)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"collector URL must be http(s)://HOST:PORT, not {url!r}")
    if not parsed.host:
        raise ValueError(f"collector URL has no host: {url!r}")
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def open_spool(directory: str | os.PathLike[str], *, max_bytes: int, tries: int = 64) -> EventSpool:
    """Open the spool in C{directory}, or in C{directory/p1}... when another
    live process (a sibling C{--workers} process) holds it.

    Every process of a restarted group takes one of the same directories
    again, so every backlog is replayed.
    """
    base = Path(directory)
    for i in range(tries):
        try:
            return EventSpool(base if i == 0 else base / f"p{i}", max_bytes=max_bytes)
        except SpoolLocked:
            continue
    raise SpoolLocked(f"{base}: {tries} spool directories all in use")


def make_event_sink(
    reactor: Any,
    *,
    collector_url: str | None,
    db_path: str | None,
    collector_urls: Sequence[str] = (),
    spool_dir: str | None,
    parse_workers: int = 1,
    parse_queue: int = 1000,
    parse_gather: float = 0.005,
    spool_max_bytes: int = 256 * 1024 * 1024,
    window_bytes: int = 8 * 1024 * 1024,
    heartbeat_interval: float = 5.0,
    backoff_initial: float = 0.25,
    backoff_max: float = 5.0,
    connect_timeout: float = 5.0,
    flush_interval: float = 0.05,
    parse_drain_timeout: float = 2.0,
    ack_drain_timeout: float = 2.0,
    log_events: bool = True,
    log_lines_per_second: int = 50,
    analyse: AnalyseFn | None = None,
    endpoint: IStreamClientEndpoint | None = None,
    store_factory: Callable[[str], StoreLike] | None = None,
    no_estimate: frozenset[str] = frozenset(),
    collector_key: str | None = None,
) -> tuple[ITransactionSink, IService]:
    """Build the event sink and the service that runs it (the same object).

    With C{collector_url}, events go over the collector link; without it,
    into C{store_factory(db_path or default_db_path())} (the embedded store:
    the caller passes the collector's C{EventStore}) in a writer thread.
    C{spool_dir} defaults to C{llmobserve.paths.default_spool_dir()}.
    C{collector_urls} lists every collector when C{endpoint} rotates over
    several (C{--collector} repeated); C{collector_url} is the first.

    C{no_estimate} names the providers whose streams without usage stay
    unpriced (C{--stream-usage PROVIDER=off}); the others are estimated.

    One parse thread by default: the event threads share the proxy's core
    and the GIL with the reactor, and a second parse thread only adds GIL
    hand-offs (on the slower machine it cost ~11-14% more CPU per request
    at c=64 in three A/B runs, docs/BENCHMARKS.md session 7).

    @raise ValueError: a bad collector URL, or no C{store_factory} without one.
    @raise SpoolLocked: every candidate spool directory is in use.
    """
    if spool_dir is None:
        from llmobserve.paths import default_spool_dir

        spool_dir = str(default_spool_dir())
    spool = open_spool(spool_dir, max_bytes=spool_max_bytes)
    turns = ReactorTurns(reactor)
    try:
        outbox = Outbox(acked_seq=spool.acked_seq, last_seq=spool.last_seq, max_bytes=window_bytes)
        delivery: Delivery
        if collector_url is not None:
            host, port = parse_collector_url(collector_url)
            if endpoint is None:
                if collector_url.startswith("https:"):
                    raise ValueError("an https:// collector needs its TLS endpoint given")
                endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
            delivery = CollectorLink(
                reactor,
                endpoint,
                outbox,
                proxy_id=spool.proxy_id,
                url=collector_url,
                urls=collector_urls,
                heartbeat_interval=heartbeat_interval,
                retry=retry_policy(initial=backoff_initial, cap=backoff_max),
                key=collector_key,
            )
            mode = "link"
        else:
            if store_factory is None:
                raise ValueError("events without a collector need a store_factory")
            if db_path is None:
                from llmobserve.paths import default_db_path

                db_path = str(default_db_path())
            delivery = EmbeddedWriter(
                reactor,
                outbox,
                db_path,
                store_factory=store_factory,
                pause=turns.pause,
            )
            mode = "embedded"
        pipeline = EventPipeline(
            reactor,
            spool=spool,
            outbox=outbox,
            delivery=delivery,
            mode=mode,
            parse_workers=parse_workers,
            parse_queue=parse_queue,
            parse_gather=parse_gather,
            analyse=analyse if analyse is not None else default_analyse(no_estimate),
            flush_interval=flush_interval,
            parse_drain_timeout=parse_drain_timeout,
            ack_drain_timeout=ack_drain_timeout,
            log_events=log_events,
            log_lines_per_second=log_lines_per_second,
            turns=turns,
            orphans=OrphanSpools(Path(spool_dir), spool, max_bytes=spool_max_bytes),
        )
    except BaseException:
        spool.close()
        raise
    return pipeline, pipeline
