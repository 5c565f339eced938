"""Collector ingest throughput: events/s from link frames to committed SQLite rows.

Starts C{twistd -n llmobserve-collector} on a loopback ephemeral port with a
fresh store, opens C{--links} link connections (one proxy id each), and has
every link send its share of C{--events} events in batches of C{--batch},
keeping at most C{--window} batches unacknowledged. The clock runs from the
first byte sent to the last ack received: an ack means committed (LINK.md).
The frames are encoded before the clock starts, so the figure is the
collector's, not the client's. For comparison the same events are inserted
straight into an L{EventStore} in this process (the store's own ceiling).

It also reports the CPU one stored event costs the thread that stores it
(C{time.thread_time}, median of C{--cpu-repeats}, batches of C{--cpu-batch}):
C{EventStore.insert} as the collector's writer runs it (C{synchronous=FULL}),
and the proxy's embedded writer (msgpack records decoded, then inserted, with
C{synchronous=NORMAL}).

Bounded: it stops after C{--timeout} seconds whatever happens, and always
kills the collector. Prints one answer line; C{--json} prints it as JSON.

    .venv/bin/python bench/collector_ingest.py [--events 200000] [--links 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from llmobserve.collector import EventStore
from llmobserve.events import MAGIC, FrameDecoder, encode_frame
from llmobserve.events._embedded import _insert as embedded_insert
from llmobserve.events._record import pack_event


def make_event(i: int, proxy: int) -> dict[str, Any]:
    """A realistic chat-completion event (about 700 bytes of msgpack)."""
    return {
        "id": uuid.uuid4().hex,
        "kind": "call",
        "ts": 1_750_000_000.0 + i * 0.001,
        "duration_ms": 812.4,
        "ttfb_ms": 301.2,
        "overhead_ms": 0.09,
        "method": "POST",
        "host": "api.openai.com",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "provider": "openai",
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini-2024-07-18",
        "streamed": i % 2 == 0,
        "usage": {"input_tokens": 1200 + i % 50, "cached_input_tokens": 512, "output_tokens": 220},
        "usage_source": "reported",
        "cost_usd": 0.000312,
        "price_ref": {"source": "genai-prices", "model": "gpt-4o-mini"},
        "request_bytes": 2048,
        "response_bytes": 1536,
        "context": {
            "run_id": f"run-{i // 100}",
            "customer_id": f"cust-{i % 17}",
            "tenant_id": "t1",
            "section": "answer",
            "section_path": "agent/answer",
        },
        "flags": [],
        "proxy": proxy,
    }


def cpu_per_event(
    tmp: Path, events: list[dict[str, Any]], batch: int, repeats: int
) -> tuple[float, float]:
    """Median thread CPU (us) per stored event: the collector's insert, the embedded writer's."""
    records = [(seq, pack_event(e)) for seq, e in enumerate(events)]
    store_us: list[float] = []
    embedded_us: list[float] = []
    for r in range(repeats):
        store = EventStore(tmp / f"cpu-{r}.sqlite3", synchronous="FULL")
        t0 = time.thread_time()
        for k in range(0, len(events), batch):
            store.insert(events[k : k + batch])
        store_us.append((time.thread_time() - t0) / len(events) * 1e6)
        store.close()
        store = EventStore(tmp / f"cpu-embedded-{r}.sqlite3", synchronous="NORMAL")
        t0 = time.thread_time()
        for k in range(0, len(records), batch):
            # records read back from the spool: decoded and converted in the writer
            embedded_insert(store, records[k : k + batch], None, None)
        embedded_us.append((time.thread_time() - t0) / len(records) * 1e6)
        store.close()
    return statistics.median(store_us), statistics.median(embedded_us)


def start_collector(db: Path, timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    twistd = Path(sys.executable).with_name("twistd")
    cmd = [str(twistd), "-n", "--pidfile=", "llmobserve-collector"]
    cmd += ["--port", "tcp:0:interface=127.0.0.1", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(rb"llmobserve collector listening on http://[^:]+:(\d+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the log
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit("collector did not start")


def run_link(
    port: int, proxy_id: str, frames: list[tuple[int, bytes]], window: int, result: dict[str, Any]
) -> None:
    """Send every frame with at most C{window} unacked; record the last ack time."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = FrameDecoder()
    sock.sendall(MAGIC + encode_frame({"t": "hello", "proxy_id": proxy_id, "version": 1}))

    def read() -> list[dict[str, Any]]:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("collector closed the link")
        return decoder.feed(data)

    while not any(m["t"] == "welcome" for m in read()):
        pass
    acked = -1
    sent = 0
    last_seq = frames[-1][0]
    while acked < last_seq:
        # seqs are 0..n-1 in batch order: acked + 1 batches are acknowledged
        while sent < len(frames) and sent - (acked + 1) < window:
            sock.sendall(frames[sent][1])
            sent += 1
        for m in read():
            if m["t"] == "ack":
                acked = m["seq"]
    result["done"] = time.perf_counter()
    sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--links", type=int, default=2)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--cpu-events", type=int, default=20_000)
    ap.add_argument("--cpu-batch", type=int, default=200)
    ap.add_argument("--cpu-repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-"))
    proc: subprocess.Popen[bytes] | None = None

    def give_up() -> None:
        # never leave the collector behind, even when the bench is stuck
        if proc is not None:
            proc.kill()
        print("collector ingest: timed out", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        per_link = args.events // args.links
        events = [[make_event(i, p) for i in range(per_link)] for p in range(args.links)]
        frames = [
            [
                (seq, encode_frame({"t": "batch", "seq": seq, "events": evs[k : k + args.batch]}))
                for seq, k in enumerate(range(0, per_link, args.batch))
            ]
            for evs in events
        ]
        total = per_link * args.links

        # Baseline: the store alone, in this process, same batches.
        base_store = EventStore(tmp / "baseline.sqlite3")
        t0 = time.perf_counter()
        for evs in events:
            for k in range(0, per_link, args.batch):
                base_store.insert(evs[k : k + args.batch])
        baseline = total / (time.perf_counter() - t0)
        base_store.close()

        cpu_events = [make_event(i, 9) for i in range(args.cpu_events)]
        store_cpu, embedded_cpu = cpu_per_event(tmp, cpu_events, args.cpu_batch, args.cpu_repeats)
        del cpu_events

        proc, port = start_collector(tmp / "events.sqlite3", 30.0)
        results: list[dict[str, Any]] = [{} for _ in range(args.links)]
        threads = [
            threading.Thread(
                target=run_link,
                args=(port, f"bench-proxy-{p}", frames[p], args.window, results[p]),
                daemon=True,
            )
            for p in range(args.links)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
        if not all("done" in r for r in results):
            raise SystemExit("a link did not finish")
        elapsed = max(r["done"] for r in results) - t0
        rate = total / elapsed

        check = EventStore(tmp / "events.sqlite3")
        stored = check.count()
        check.close()
        answer = {
            "events": total,
            "stored": stored,
            "seconds": round(elapsed, 3),
            "events_per_s": round(rate),
            "store_alone_events_per_s": round(baseline),
            "store_cpu_us_per_event": round(store_cpu, 2),
            "embedded_cpu_us_per_event": round(embedded_cpu, 2),
            "links": args.links,
            "batch": args.batch,
            "window": args.window,
        }
        if args.json:
            print(json.dumps(answer))
        else:
            print(
                f"collector ingest: {rate:,.0f} events/s "
                f"({total:,} events over {args.links} links, batch {args.batch}, "
                f"window {args.window}, {elapsed:.2f} s, {stored:,} stored; "
                f"store alone in-process: {baseline:,.0f} events/s; CPU per stored event: "
                f"insert {store_cpu:.1f} us, embedded writer {embedded_cpu:.1f} us)"
            )
        if stored != total:
            raise SystemExit(f"stored {stored} != sent {total}")
    finally:
        watchdog.cancel()
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
