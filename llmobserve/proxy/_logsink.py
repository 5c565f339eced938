"""The simplest sink: one cheap log line per exchange, nothing stored."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from llmobserve.proxy.transaction import ITransactionSink, Transaction


@implementer(ITransactionSink)
class LoggingSink:
    """Logs method, target, status, outcome and timings of each exchange."""

    _log = Logger()

    def __init__(self) -> None:
        self.count = 0

    def transaction_finished(self, transaction: Transaction) -> None:
        self.count += 1
        self._log.info(
            "{method} {scheme}://{host}{path} -> {status} {outcome} "
            "ttfb={ttfb_ms}ms total={duration_ms:.1f}ms",
            method=transaction.method,
            scheme=transaction.scheme,
            host=transaction.host,
            path=transaction.path,
            status=transaction.status,
            outcome=transaction.outcome.value,
            ttfb_ms=None if transaction.ttfb is None else round(transaction.ttfb * 1000, 1),
            duration_ms=transaction.duration * 1000,
        )

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        self.count += len(spans)

    def health(self) -> Mapping[str, Any]:
        return {"collector": {"state": "none"}, "events_waiting": 0}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return [("llmobserve_sink_records_total", "counter", "Records logged", self.count)]
