"""C{GET /metrics}: the proxy's figures through C{prometheus_client}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import h11
from prometheus_client.parser import text_string_to_metric_families
from support.inmemory import InMemoryProxy

from llmobserve.proxy._metrics import MetricsExposition


class _Pool:
    def idle_count(self) -> int:
        return 2


class _Sink:
    def __init__(self, samples: Sequence[tuple[str, str, str, float]] | None = None) -> None:
        self._samples = samples

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        if self._samples is None:
            raise RuntimeError("broken sink")
        return self._samples


class _Services:
    def __init__(self, sink: _Sink, requests_total: int = 0) -> None:
        self.stats = {"requests_total": requests_total, "in_flight": 3}
        self.pool = _Pool()
        self.sink = sink


def values(body: bytes) -> Mapping[str, tuple[str, float]]:
    """Each sample's name -> (family type, value), as a Prometheus server reads them."""
    return {
        sample.name: (family.type, sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_a_counter_past_a_million_is_exact() -> None:
    """A counter of 1234567 reads back as 1234567 (C{f"{v:g}"} printed 1.23457e+06,
    so a counter moved in steps of ten past a million)."""
    sink = _Sink([("llmobserve_events_total", "counter", "Events", 123456789)])
    body = MetricsExposition(_Services(sink, requests_total=1234567)).render()
    got = values(body)
    assert got["llmobserve_requests_total"] == ("counter", 1234567)
    assert got["llmobserve_events_total"] == ("counter", 123456789)
    assert got["llmobserve_requests_in_flight"] == ("gauge", 3)
    assert got["llmobserve_upstream_idle_connections"] == ("gauge", 2)
    assert b"1.23457e+06" not in body


def test_the_figures_are_read_at_scrape_time() -> None:
    """The collector holds no copy: a second scrape sees the counters as they are now."""
    services = _Services(_Sink([]), requests_total=1)
    exposition = MetricsExposition(services)
    assert values(exposition.render())["llmobserve_requests_total"][1] == 1
    services.stats["requests_total"] = 5
    assert values(exposition.render())["llmobserve_requests_total"][1] == 5


def test_a_failing_sink_leaves_the_proxys_own_figures() -> None:
    """A sink whose C{metrics()} raises costs its own samples, not the scrape."""
    got = values(MetricsExposition(_Services(_Sink(None), requests_total=4)).render())
    assert got["llmobserve_requests_total"] == ("counter", 4)
    assert "llmobserve_events_total" not in got


def test_the_route_serves_the_text_format() -> None:
    """C{GET /metrics} on the proxy answers Prometheus' text format 0.0.4."""
    proxy = InMemoryProxy()
    channel, client = proxy.client()
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.receive_data(client.value())
    head: Any = conn.next_event()
    body = b""
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    assert head.status_code == 200
    assert dict(head.headers)[b"content-type"] == b"text/plain; version=0.0.4; charset=utf-8"
    assert values(body)["llmobserve_requests_in_flight"][0] == "gauge"
