"""CPU per event on the event path: parse, price, build, pack, spool, deliver.

Feeds transactions shaped like C{bench.overhead}'s (a chat completion from
the fake OpenAI upstream in C{bench._upstream}, and its short SSE stream)
through three layers and reports process CPU time per event:

  - C{parse}: L{EventPipeline._parse} alone (analyse, build, pack), in this
    thread, no reactor;
  - C{null}: the whole pipeline on a real reactor (parse pool with its
    gather window, spool appends, log lines, the outbox) with a delivery
    that acknowledges at once;
  - C{embedded}: the same with the real embedded SQLite store in a temp dir.

The pipelines are fed at C{--rate} events/s (the PERFORMANCE.md target
rate by default), so batching is what a loaded proxy sees. Per-thread CPU
(from C{/proc/self/task/*/schedstat}, Linux) splits each pipeline figure
into the parse threads, the reactor and the store/spool threads. The
process is pinned to one core, like the proxy in C{bench.overhead}. Every
figure is the best (and median) of C{--repeats} runs; the parse-thread
figure is what PERFORMANCE.md's 100 us/request budget is most sensitive to.
Log lines go to /dev/null through a text file observer, as under twistd.
Prints detail lines, then one answer line.

    .venv/bin/python -m bench.event_path [--events 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import globalLogBeginner, textFileLogObserver

from bench._upstream import _BODY, SSE_FIRST, SSE_REST
from bench.overhead import _CHAT_BODY, _SSE_BODY
from llmobserve.events import EventPipeline, make_event_sink, open_spool
from llmobserve.events._outbox import Outbox
from llmobserve.proxy._tap import open_embedded_store
from llmobserve.transaction import Context, Outcome, Transaction

_REQUEST_HEADERS = (
    (b"Content-Type", b"application/json"),
    (b"Accept", b"application/json"),
    (b"Authorization", b"Bearer sk-bench-not-a-key"),
    (b"User-Agent", b"llmobserve-bench/1"),
)


def _dechunk(wire: bytes) -> tuple[tuple[tuple[bytes, bytes], ...], bytes]:
    """Split a canned chunked response into header pairs and the de-chunked body."""
    head, _, rest = wire.partition(b"\r\n\r\n")
    headers = tuple(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return headers, body


def chat_transaction(started_at: float) -> Transaction:
    """A proxied chat completion as the relay hands it over."""
    request = (*_REQUEST_HEADERS, (b"Content-Length", str(len(_CHAT_BODY)).encode()))
    response = (
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(_BODY)).encode()),
        (b"x-request-id", b"req_bench"),
        (b"openai-processing-ms", b"1"),
    )
    return _transaction(started_at, "/v1/chat/completions", request, _CHAT_BODY, response, _BODY)


def sse_transaction(started_at: float) -> Transaction:
    """A proxied chat completion stream (5 events, usage, [DONE])."""
    request = (*_REQUEST_HEADERS, (b"Content-Length", str(len(_SSE_BODY)).encode()))
    response, body = _dechunk(SSE_FIRST + SSE_REST)
    return _transaction(started_at, "/v1/sse/chat/completions", request, _SSE_BODY, response, body)


def _transaction(
    started_at: float,
    path: str,
    request_headers: tuple[tuple[bytes, bytes], ...],
    request_body: bytes,
    response_headers: tuple[tuple[bytes, bytes], ...],
    response_body: bytes,
) -> Transaction:
    return Transaction(
        started_at=started_at,
        method="POST",
        scheme="http",
        host="127.0.0.1",
        port=8001,
        path=path,
        query="",
        request_headers=request_headers,
        context=Context(),
        provider_hint="openai",  # what --provider-host 127.0.0.1:PORT=openai gives
        status=200,
        response_headers=response_headers,
        request_body=request_body,
        request_body_truncated=False,
        response_body=response_body,
        response_body_truncated=False,
        request_bytes=len(request_body),
        response_bytes=len(response_body),
        ttfb=0.00031,
        duration=0.00042,
        overhead=0.00009,
        outcome=Outcome.OK,
    )


# -- per-thread CPU -------------------------------------------------------------


def _thread_group(name: str) -> str:
    if "parse" in name:
        return "parse"
    if "store" in name:
        return "store"
    if "spool" in name:
        return "spool"
    if name == "MainThread":
        return "reactor"
    return "other"


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every live Python thread, by native id (Linux)."""
    out: dict[int, tuple[str, float]] = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[tid] = (_thread_group(thread.name), ns / 1e9)
    return out


def _by_group(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    groups: dict[str, float] = {}
    for tid, (group, seconds) in after.items():
        start = before.get(tid, (group, 0.0))[1]
        groups[group] = groups.get(group, 0.0) + seconds - start
    return groups


# -- (a) the parse function alone -------------------------------------------------


@contextmanager
def _bare_pipeline() -> Iterator[EventPipeline]:
    """An unstarted pipeline over a temp spool: only its parse method is used."""
    workdir = Path(tempfile.mkdtemp(prefix="llmo-event-path-"))
    pipeline = _null_pipeline(None, workdir)
    try:
        yield pipeline
    finally:
        pipeline.spool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _default_analyse() -> Any:
    from llmobserve.events._exchange import default_analyse

    return default_analyse()


def measure_parse(make: Callable[[float], Transaction], events: int, repeats: int) -> list[float]:
    """Process CPU microseconds per L{EventPipeline._parse}, one sample per repeat."""
    txns = [make(1_700_000_000.0 + i * 0.001) for i in range(events)]
    samples = []
    with _bare_pipeline() as pipeline:
        for txn in txns[:200]:
            pipeline._parse(txn)  # warm the price caches
        for _ in range(repeats):
            start = time.process_time()
            for txn in txns:
                pipeline._parse(txn)
            samples.append((time.process_time() - start) / events * 1e6)
    return samples


# -- (b) and (c) the whole pipeline on a real reactor -----------------------------


class _NullDelivery(Service):
    """Takes everything the outbox has and acknowledges it at once."""

    state = "connected"
    url = "null"
    connected = True
    reconnects = 0
    row_for = None  # like the collector link: no store rows made ahead

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        outbox.on_ready = self.pump

    def hold_row(self, seq: int, row: Any) -> None:
        pass

    def pump(self) -> None:
        while True:
            records = self.outbox.take(1000, 4 * 1024 * 1024)
            if not records:
                return
            self.outbox.ack(records[-1][0])


def _null_pipeline(reactor: Any, workdir: Path) -> EventPipeline:
    spool = open_spool(workdir / "spool", max_bytes=256 * 1024 * 1024)
    outbox = Outbox(acked_seq=spool.acked_seq, last_seq=spool.last_seq)
    return EventPipeline(
        reactor,
        spool=spool,
        outbox=outbox,
        delivery=_NullDelivery(outbox),  # type: ignore[arg-type]  # duck-typed delivery
        mode="bench",
        analyse=_default_analyse(),
        parse_gather=0.005,  # make_event_sink's default
    )


def _embedded_pipeline(reactor: Any, workdir: Path) -> EventPipeline:
    sink, _service = make_event_sink(
        reactor,
        collector_url=None,
        db_path=str(workdir / "events.sqlite3"),
        spool_dir=str(workdir / "spool"),
        store_factory=open_embedded_store,
    )
    assert isinstance(sink, EventPipeline)
    return sink


@inlineCallbacks
def _feed(
    reactor: Any,
    pipeline: EventPipeline,
    make: Callable[[float], Transaction],
    events: int,
    rate: float,
) -> Generator[Deferred[Any], Any, None]:
    """Submit C{events} transactions at C{rate}/s in 1 ms ticks; wait until all
    are delivered (acknowledged by the delivery)."""
    per_tick = max(1, round(rate / 1000))
    target = pipeline.events_total + events
    base = time.time()
    txns = [make(base + i * 1e-4) for i in range(events)]  # built off the clock
    sent = 0
    while sent < events:
        for txn in txns[sent : sent + per_tick]:
            pipeline.transaction_finished(txn)
        sent += per_tick
        yield task.deferLater(reactor, 0.001, lambda: None)
    deadline = time.monotonic() + 60
    while (pipeline.events_total < target or pipeline.outbox.waiting) and (
        time.monotonic() < deadline
    ):
        yield task.deferLater(reactor, 0.001, lambda: None)
    if pipeline.parse_skipped_total:
        raise RuntimeError(f"{pipeline.parse_skipped_total} events skipped: lower --rate")


@inlineCallbacks
def measure_pipeline(
    reactor: Any,
    build: Callable[[Any, Path], EventPipeline],
    make: Callable[[float], Transaction],
    events: int,
    repeats: int,
    rate: float,
) -> Generator[Deferred[Any], Any, list[tuple[float, dict[str, float]]]]:
    """(process CPU us/event, per-thread-group us/event) for each repeat."""
    samples: list[tuple[float, dict[str, float]]] = []
    for _ in range(repeats):
        workdir = Path(tempfile.mkdtemp(prefix="llmo-event-path-"))
        pipeline = build(reactor, workdir)
        pipeline.startService()
        try:
            # a first event opens the store and warms the caches, off the clock
            yield _feed(reactor, pipeline, make, min(events, 200), rate)
            threads_before = _thread_cpu()
            start = time.process_time()
            yield _feed(reactor, pipeline, make, events, rate)
            cpu = time.process_time() - start
            groups = _by_group(threads_before, _thread_cpu())
            samples.append((cpu / events * 1e6, {k: v / events * 1e6 for k, v in groups.items()}))
        finally:
            yield pipeline.stopService()
            shutil.rmtree(workdir, ignore_errors=True)
    return samples


# -- reporting ------------------------------------------------------------------


def _fmt(samples: list[float]) -> str:
    return f"best {min(samples):6.1f}  median {statistics.median(samples):6.1f} us/event"


def _fmt_pipeline(samples: list[tuple[float, dict[str, float]]]) -> tuple[str, float, float]:
    total = [s for s, _ in samples]
    groups = sorted({g for _, gs in samples for g in gs})
    parts = []
    for group in groups:
        values = [gs.get(group, 0.0) for _, gs in samples]
        parts.append(f"{group} {statistics.median(values):.1f}")
    parse = statistics.median([gs.get("parse", 0.0) for _, gs in samples])
    return f"{_fmt(total)}  (median by thread: {', '.join(parts)})", min(total), parse


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.event_path", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=10_000, help="events per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--rate", type=float, default=10_000, help="pipeline feed rate, events/s")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin to one core (the proxy runs pinned to one in bench.overhead)",
    )
    parser.add_argument("--kinds", default="chat,sse", help="chat, sse or both")
    parser.add_argument(
        "--cases",
        default="parse,null,embedded",
        help="comma-separated subset of parse,null,embedded",
    )
    args = parser.parse_args()
    events = min(max(args.events, 100), 1_000_000)
    repeats = min(max(args.repeats, 1), 50)
    cases = set(args.cases.split(","))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2 and not args.no_pin:
        # every thread started from here on inherits it: the reactor, the
        # parse, spool and store threads share one core, as in the proxy
        os.sched_setaffinity(0, {cores[-1]})
    devnull = open(os.devnull, "w")  # lives as long as the process
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(devnull)], discardBuffer=True, redirectStandardIO=False
    )
    kinds: list[tuple[str, Callable[[float], Transaction]]] = [
        (kind, make)
        for kind, make in (("chat", chat_transaction), ("sse", sse_transaction))
        if kind in args.kinds.split(",")
    ]
    answer: dict[str, str] = {}

    for kind, make in kinds:
        if "parse" in cases:
            samples = measure_parse(make, events, repeats)
            print(f"{kind:4s} parse (analyse+build+pack)  {_fmt(samples)}", flush=True)
            answer[f"{kind} parse"] = f"{min(samples):.1f}"

    @inlineCallbacks
    def pipelines(reactor: Any) -> Generator[Deferred[Any], Any, None]:
        builders: list[tuple[str, Callable[[Any, Path], EventPipeline]]] = [
            ("null", _null_pipeline),
            ("embedded", _embedded_pipeline),
        ]
        for name, build in builders:
            if name not in cases:
                continue
            for kind, make in kinds:
                try:
                    samples = yield measure_pipeline(
                        reactor, build, make, events, repeats, args.rate
                    )
                except Exception as e:  # the log goes to /dev/null: say it here
                    print(f"{kind:4s} pipeline, {name:8s} delivery  failed: {e}", flush=True)
                    continue
                text, best, parse = _fmt_pipeline(samples)
                print(f"{kind:4s} pipeline, {name:8s} delivery  {text}", flush=True)
                answer[f"{kind} {name}"] = f"{best:.1f} (parse threads {parse:.1f})"

        _print_answer(answer)

    if cases & {"null", "embedded"}:
        task.react(pipelines)  # exits the process when done
    _print_answer(answer)


def _print_answer(answer: dict[str, str]) -> None:
    print("event path CPU us/event: " + " | ".join(f"{k} {v}" for k, v in answer.items()))


if __name__ == "__main__":
    main()
