"""The simplest sink: counts exchanges and logs a summary, records nothing.

Used with C{--no-events} to measure or run the bare forwarding path. A
log line per call would cost more than the relay itself (a twisted.logger
event is tens of microseconds), so calls are counted and summarised every
C{interval} seconds; only failed exchanges are logged one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from llmobserve.transaction import ITransactionSink, Outcome, Transaction

_QUIET = frozenset({Outcome.OK, Outcome.UPSTREAM_ERROR})


@implementer(ITransactionSink)
class LoggingSink:
    """Counts calls by outcome; logs failures and a periodic summary."""

    _log = Logger()

    store_path = None  # nothing is stored

    def __init__(self, clock: Any = None, interval: float = 10.0) -> None:
        self.count = 0
        self.by_outcome: dict[str, int] = {}
        self._clock = clock
        self._interval = interval
        self._logged = 0
        self._call: Any = None

    def transaction_finished(self, transaction: Transaction) -> None:
        self.count += 1
        outcome = transaction.outcome
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        if outcome not in _QUIET:
            self._log.info(
                "{method} {scheme}://{host}:{port}{path} -> {status} {outcome} ({error})",
                method=transaction.method,
                scheme=transaction.scheme,
                host=transaction.host,
                port=transaction.port,
                path=transaction.path,
                status=transaction.status,
                outcome=outcome.value,
                error=transaction.error,
            )
        if self._clock is not None and self._call is None:
            self._call = self._clock.callLater(self._interval, self._summarise)

    def _summarise(self) -> None:
        self._call = None
        if self.count != self._logged:
            self._log.info(
                "{n} calls relayed in the last {s:g}s ({total} in all; {outcomes})",
                n=self.count - self._logged,
                s=self._interval,
                total=self.count,
                outcomes=", ".join(f"{k}={v}" for k, v in sorted(self.by_outcome.items())),
            )
            self._logged = self.count

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        pass

    def health(self) -> Mapping[str, Any]:
        return {"collector": {"mode": "none", "state": "none"}, "events_waiting": 0}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return [("llmobserve_calls_logged_total", "counter", "Calls seen", self.count)]
