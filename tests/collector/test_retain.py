"""--retain: the collector deletes events older than the span, in chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python import usage

from llmobserve.collector._retain import Retention, format_span, parse_span
from llmobserve.collector._store import EventStore
from llmobserve.collector._tap import Options
from llmobserve.collector._writer import BatchWriter

DAY = 86400.0


class _Runner:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.jobs = 0

    def submit(self, job: Any) -> Deferred[Any]:
        self.jobs += 1
        try:
            return succeed(job(self.store))
        except Exception as e:
            return fail(e)


def test_parse_span() -> None:
    assert parse_span("90d") == 90 * DAY
    assert parse_span("12h") == 12 * 3600
    assert parse_span(" 2W ") == 14 * DAY
    for bad in ("", "90", "d", "-1d", "0d", "1y"):
        with pytest.raises(ValueError):
            parse_span(bad)


def test_format_span_gives_a_span_as_retain_takes_it() -> None:
    """The log names the span as the user wrote it, not in seconds."""
    assert format_span(172_800) == "2d"
    assert format_span(14 * 86_400) == "2w"
    assert format_span(5_400) == "90m"
    assert format_span(12 * 3_600) == "12h"
    assert format_span(90) == "90s"
    assert format_span(1.5) == "1.5s"
    for text in ("90d", "12h", "2w", "30m", "45s"):
        assert parse_span(format_span(parse_span(text))) == parse_span(text)


def test_the_retain_option() -> None:
    options = Options()
    options.parseOptions(["--retain", "90d"])
    assert options["retain"] == 90 * DAY
    with pytest.raises(usage.UsageError, match="--retain"):
        Options().parseOptions(["--retain", "ninety days"])


def test_retention_deletes_in_chunks_now_and_every_interval(tmp_path: Path) -> None:
    """At start: what is older than the span, chunk by chunk (a job each);
    the stored count goes down; an hour later, what has aged since."""
    clock = Clock()
    clock.advance(100 * DAY)
    store = EventStore(tmp_path / "x.sqlite3")
    now = clock.seconds()
    old = [{"id": f"old{i}", "kind": "call", "ts": now - 91 * DAY + i} for i in range(25)]
    ageing = [{"id": "ageing", "kind": "call", "ts": now - 90 * DAY + 1800}]
    fresh = [{"id": f"new{i}", "kind": "call", "ts": now - DAY} for i in range(3)]
    store.insert(old + ageing + fresh)
    runner = _Runner(store)
    writer = BatchWriter(runner)
    writer.stored = store.count()
    retention = Retention(clock, runner, writer, 90 * DAY, interval=3600, chunk=10)
    retention.startService()
    assert (retention.dropped, runner.jobs) == (25, 3)  # 10 + 10 + 5
    assert writer.stored == store.count() == 4
    clock.advance(3600)
    assert retention.dropped == 26
    assert sorted(e["id"] for e in store.events()) == ["new0", "new1", "new2"]
    retention.stopService()
    store.close()
