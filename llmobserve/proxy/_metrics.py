"""C{GET /metrics}: the proxy's own figures in Prometheus' text format.

The figures are the plain counters the relay and the event sink keep
anyway; L{ProxyMetrics} is a C{prometheus_client} custom collector that
reads them when a scrape asks, so the per-request path does no extra work.
Formatting is C{prometheus_client}'s (a counter of 1234567 is
C{1.234567e+06}, exact, where C{f"{value:g}"} gave C{1.23457e+06}). This
module is imported on the first scrape: a proxy nobody scrapes does not
load C{prometheus_client}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.logger import Logger

__all__ = ["CONTENT_TYPE", "MetricsExposition", "ProxyMetrics"]

_log = Logger()

#: The exposition format the body is written in.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()

Sample = tuple[str, str, str, float]


class ProxyMetrics:
    """A C{prometheus_client} collector over the relay's services and the sink.

    @param services: the relay's C{RelayServices} (C{stats}, C{pool}, C{sink}).
    """

    def __init__(self, services: Any) -> None:
        self._s = services

    def samples(self) -> list[Sample]:
        """The figures as (name, type, help, value), read now."""
        stats = self._s.stats
        samples: list[Sample] = [
            ("llmobserve_requests_total", "counter", "Requests relayed", stats["requests_total"]),
            ("llmobserve_requests_in_flight", "gauge", "Requests in flight", stats["in_flight"]),
            (
                "llmobserve_requests_key_refused_total",
                "counter",
                "Calls and span posts refused for their client key (401/503), not forwarded",
                stats.get("key_refused_total", 0),
            ),
            (
                "llmobserve_upstream_idle_connections",
                "gauge",
                "Idle pooled upstream connections",
                self._s.pool.idle_count(),
            ),
        ]
        try:
            samples.extend(self._s.sink.metrics())
        except Exception:
            _log.failure("sink metrics failed")
        return samples

    def collect(self) -> Iterator[Metric]:
        """One metric family per figure (C{prometheus_client}'s collector protocol)."""
        for name, kind, help_text, value in self.samples():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=value)


class MetricsExposition:
    """The C{/metrics} body: one registry holding one L{ProxyMetrics}."""

    def __init__(self, services: Any) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ProxyMetrics(services))

    def render(self) -> bytes:
        """The text exposition of every figure, read at this moment."""
        return generate_latest(self._registry)
