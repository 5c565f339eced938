"""Writer grouping, the store thread, time bounds, and the twistd options."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.python import usage

from llmobserve.collector import _writer
from llmobserve.collector._store import EventStore
from llmobserve.collector._tap import Options, makeService
from llmobserve.collector._thread import StoreThread
from llmobserve.collector._timespec import TimeSpecError, parse_time
from llmobserve.collector._writer import BatchWriter


class ManualRunner:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.jobs: list[tuple[Callable[[EventStore], Any], Deferred[Any]]] = []

    def submit(self, job: Callable[[EventStore], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def step(self, error: Exception | None = None) -> None:
        job, d = self.jobs.pop(0)
        if error is not None:
            d.errback(error)
        else:
            d.callback(job(self.store))


def evs(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "ts": float(i)} for i in range(n)]


def test_writer_groups_queued_batches(tmp_path: Path) -> None:
    """Batches queued while a commit runs are written together in the next one."""
    store = EventStore(tmp_path / "x.sqlite3")
    runner = ManualRunner(store)
    w = BatchWriter(runner)
    done: list[str] = []
    w.write(evs("a", 1), "p", 1).addCallback(lambda _: done.append("a"))
    w.write(evs("b", 1), "p", 2).addCallback(lambda _: done.append("b"))
    w.write(evs("c", 1), "q", 1).addCallback(lambda _: done.append("c"))
    assert len(runner.jobs) == 1 and w.queued == 3
    runner.step()
    assert done == ["a"] and len(runner.jobs) == 1
    runner.step()
    assert done == ["a", "b", "c"]
    assert w.commits == 2 and w.stored == 3 and w.queued == 0 and w.idle()
    assert store.links() == {"p": 2, "q": 1}
    store.close()


def test_writer_caps_transaction_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction takes whole batches up to the cap (at least one batch)."""
    monkeypatch.setattr(_writer, "MAX_TRANSACTION_EVENTS", 5)
    store = EventStore(tmp_path / "x.sqlite3")
    runner = ManualRunner(store)
    w = BatchWriter(runner)
    w.write(evs("a", 1))
    for p in "bcd":
        w.write(evs(p, 3))
    runner.step()  # a
    runner.step()  # b alone: b+c would be 6 > 5
    assert store.count() == 4
    runner.step()  # c
    runner.step()  # d
    assert store.count() == 10 and w.commits == 4
    store.close()


def test_writer_failure_errbacks_and_continues(tmp_path: Path) -> None:
    """A failed commit fails its batches; the next batches are still written."""
    store = EventStore(tmp_path / "x.sqlite3")
    runner = ManualRunner(store)
    w = BatchWriter(runner)
    failed: list[Any] = []
    w.write(evs("a", 2)).addErrback(failed.append)
    ok: list[Any] = []
    w.write(evs("b", 2)).addCallback(ok.append)
    runner.step(OSError("disk full"))
    assert len(failed) == 1 and failed[0].check(OSError)
    runner.step()
    assert ok == [None] and store.count() == 2 and w.queued == 0
    store.close()


class ThreadReactor:
    """callFromThread that queues calls for the test thread to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.cond = threading.Condition()

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        with self.cond:
            self.calls.append((f, args))
            self.cond.notify_all()

    def run_until(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, timeout=10)
            calls, self.calls = self.calls[:n], self.calls[n:]
        for f, args in calls:
            f(*args)


def test_store_thread_runs_jobs_in_its_own_thread(tmp_path: Path) -> None:
    """Jobs run in order on one named thread, results come back via the reactor."""
    reactor = ThreadReactor()
    t = StoreThread(reactor, lambda: EventStore(tmp_path / "x.sqlite3"), "llmo-test-writer")  # type: ignore[arg-type]  # a fake reactor
    t.startService()
    results: list[Any] = []
    t.submit(lambda s: s.insert(evs("a", 3))).addCallback(results.append)
    t.submit(lambda _: threading.current_thread().name).addCallback(results.append)
    t.submit(lambda _: 1 / 0).addErrback(lambda f: results.append(f.type))
    reactor.run_until(3)
    assert results == [3, "llmo-test-writer", ZeroDivisionError]
    stopped: list[Any] = []
    t.stopService().addCallback(stopped.append)
    reactor.run_until(1)
    assert stopped == [None]


def test_store_thread_open_failure_fails_jobs(tmp_path: Path) -> None:
    """If the store cannot open, every job fails with that error."""
    reactor = ThreadReactor()
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not sqlite" * 200)
    t = StoreThread(reactor, lambda: EventStore(bad), "llmo-test")  # type: ignore[arg-type]  # a fake reactor
    t.startService()
    errors: list[Any] = []
    t.submit(lambda s: s.count()).addErrback(errors.append)
    reactor.run_until(1)
    assert "cannot open" in str(errors[0].value)
    t.stopService()
    reactor.run_until(1)


def _run_job(reactor: ThreadReactor, t: StoreThread, job: Callable[[EventStore], Any]) -> Any:
    """C{job}'s result, run in C{t}'s thread."""
    results: list[Any] = []
    t.submit(lambda store: job(cast(EventStore, store))).addBoth(results.append)
    reactor.run_until(1)
    return results[0]


def test_store_thread_watching_its_file_reopens_it_when_removed_or_replaced(
    tmp_path: Path,
) -> None:
    """Issue 13 item 2's reader: a thread watching the store's file opens
    the file found at the path when the one it opened was removed (a new,
    empty store) or replaced (the new file's rows), instead of reading the
    unlinked file until restart."""
    reactor = ThreadReactor()
    db = tmp_path / "x.sqlite3"
    t = StoreThread(reactor, lambda: EventStore(db), "llmo-test-reader", watch=str(db))  # type: ignore[arg-type]  # a fake reactor
    t.startService()
    assert _run_job(reactor, t, lambda s: s.insert(evs("a", 3))) == 3
    assert _run_job(reactor, t, lambda s: s.count()) == 3
    for path in tmp_path.glob("x.sqlite3*"):
        path.unlink()
    assert _run_job(reactor, t, lambda s: s.count()) == 0
    assert t.reopened == 1
    db.unlink()
    other = EventStore(db)
    other.insert(evs("b", 2))
    other.close()
    assert _run_job(reactor, t, lambda s: s.count()) == 2
    assert _run_job(reactor, t, lambda s: s.count()) == 2
    assert t.reopened == 2
    t.stopService()
    reactor.run_until(1)


def test_store_thread_not_watching_keeps_the_store_it_opened(tmp_path: Path) -> None:
    """Without C{watch} (the collector's threads) the store is opened once."""
    reactor = ThreadReactor()
    db = tmp_path / "x.sqlite3"
    t = StoreThread(reactor, lambda: EventStore(db), "llmo-test-reader")  # type: ignore[arg-type]  # a fake reactor
    t.startService()
    assert _run_job(reactor, t, lambda s: s.insert(evs("a", 3))) == 3
    for path in tmp_path.glob("x.sqlite3*"):
        path.unlink()
    assert _run_job(reactor, t, lambda s: s.count()) == 3
    assert t.reopened == 0
    t.stopService()
    reactor.run_until(1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", 1000.0),
        ("24h", 1000.0 - 86400),
        ("7d", 1000.0 - 7 * 86400),
        ("30m", 1000.0 - 1800),
        ("90s", 910.0),
        ("2w", 1000.0 - 14 * 86400),
        ("1.5h", 1000.0 - 5400),
        ("1735689600", 1735689600.0),
        ("2025-01-01", 1735689600.0),
        ("2025-01-01T00:00", 1735689600.0),
        ("2025-01-01T01:00+01:00", 1735689600.0),
        ("2025-01-01T00:00:00Z", 1735689600.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    """Relative spans, unix seconds and ISO dates (UTC unless an offset says)."""
    assert parse_time(text, now=1000.0) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "24x",
        "nan",
        "inf",
        "2025-13-01",
        "9" * 400 + "s",
        "9" * 400 + "h",
        "1e308",
        "-1e308",
        "1e300h",
        "253402300800.5",
        "0001-01-01T00:00+01:00",
        "9999-12-31T23:59-01:00",
    ],
)
def test_parse_time_refuses(text: str) -> None:
    """Anything else is a TimeSpecError, and so is an instant outside the years 1 to 9999."""
    with pytest.raises(TimeSpecError):
        parse_time(text, now=0.0)


def parse(argv: list[str]) -> Options:
    """Parsed C{twistd llmobserve-collector} options (usage.Options is untyped)."""
    o = Options()
    o.parseOptions(argv)
    return o


def test_options_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults: port 8000, the documented store path, 10 s heartbeat, FULL sync."""
    monkeypatch.setenv("LLMOBSERVE_HOME", str(tmp_path))
    o = parse([])
    assert o["port"] == "8000"
    assert o["db"] == str(tmp_path / "events.sqlite3")
    assert o["heartbeat"] == 10.0
    assert o["synchronous"] == "FULL"
    o = parse(["--port", "9001", "--db", "/x.db", "--heartbeat", "2.5"])
    assert (o["port"], o["db"], o["heartbeat"]) == ("9001", "/x.db", 2.5)


@pytest.mark.parametrize("argv", [["--heartbeat", "0"], ["--synchronous", "sometimes"]])
def test_options_refused(argv: list[str]) -> None:
    """Nonsense options are usage errors."""
    with pytest.raises(usage.UsageError):
        parse(argv)


def test_make_service_bad_store(tmp_path: Path) -> None:
    """A store that cannot be opened stops start-up with a usage error."""
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not sqlite" * 200)
    o = parse(["--db", str(bad), "--port", "tcp:0:interface=127.0.0.1"])
    with pytest.raises(usage.UsageError, match="cannot open"):
        makeService(o)


def test_make_service_builds(tmp_path: Path) -> None:
    """makeService creates the store and returns the collector service (not started)."""
    o = parse(["--db", str(tmp_path / "new" / "e.sqlite3"), "--port", "0"])
    service = makeService(o)
    assert (tmp_path / "new" / "e.sqlite3").exists()
    assert not service.running


def test_interfaces(tmp_path: Path) -> None:
    """The service, the link protocol and the port switch provide Twisted's interfaces."""
    from twisted.application.service import IService, IServiceCollection
    from twisted.internet.interfaces import IProtocol, IProtocolFactory
    from twisted.internet.task import Clock
    from zope.interface.verify import verifyObject

    from llmobserve.collector._link import LinkRegistry, LinkServerProtocol
    from llmobserve.collector._port import PortSwitchFactory

    service = makeService(parse(["--db", str(tmp_path / "e.sqlite3"), "--port", "0"]))
    assert verifyObject(IService, service)
    assert verifyObject(IServiceCollection, service)
    store = EventStore(tmp_path / "e.sqlite3")
    writer = BatchWriter(ManualRunner(store))
    link = LinkServerProtocol(writer, Clock(), LinkRegistry())
    assert verifyObject(IProtocol, link)
    factory = PortSwitchFactory(lambda: link, Factory(), Clock())
    assert verifyObject(IProtocolFactory, factory)
    store.close()
