"""A lean raw-socket keep-alive load generator (its own process).

Modes:

- C{latency}: one connection, one request at a time (optionally with an
  idle gap between requests); per-request latency.
- C{throughput}: C{--concurrency} connections driven by one epoll loop,
  each sending its next request as soon as the previous response is
  complete; requests/s and latency.
- C{sse}: one connection; time from sending the request to the first
  byte of the first event.
- C{streams}: C{--concurrency} connections driven by one epoll loop, each
  with one long SSE stream in flight at a time (their first requests
  spread over C{--stagger} seconds, the next sent as soon as a stream
  ends, for C{--rounds} streams per connection or, with C{--rounds 0},
  until C{--duration} is up); per stream the time to the first event's
  bytes and to the end, and the C{data:} events received.

The request bytes are given hex-encoded (C{--request}), built by the
caller, so the same generator drives the upstream directly and the proxy.
Prints one JSON object on stdout.  Latencies are microseconds.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import socket
import sys
import time

_ns = time.perf_counter_ns


class ResponseReader:
    """Frames HTTP/1.1 responses from a byte stream (Content-Length or chunked)."""

    __slots__ = ("buf", "close_after", "need", "status")

    def __init__(self) -> None:
        self.buf = b""
        self.need = -1  # -1 head; >0 body bytes left; -2 chunked
        self.status = 0
        self.close_after = False

    def feed(self, data: bytes) -> int:
        """Add bytes; return how many responses completed."""
        buf = self.buf + data if self.buf else data
        done = 0
        while True:
            if self.need == -1:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                self.status = int(head[9:12])
                buf = buf[end + 4 :]
                self.close_after = b"connection: close" in head
                i = head.find(b"content-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i)
                    self.need = int(head[i + 15 : j if j >= 0 else len(head)])
                elif b"transfer-encoding: chunked" in head:
                    self.need = -2
                else:
                    self.need = 0
            if self.need == -2:
                k = buf.find(b"0\r\n\r\n")
                while k > 0 and buf[k - 2 : k] != b"\r\n":
                    k = buf.find(b"0\r\n\r\n", k + 1)
                if k < 0:
                    # keep only a tail that could hold the terminator
                    buf = buf[-8:]
                    break
                buf = buf[k + 5 :]
                self.need = 0
            if self.need > 0:
                take = min(self.need, len(buf))
                buf = buf[take:]
                self.need -= take
                if self.need:
                    break
            self.need = -1
            done += 1
        self.buf = buf
        return done


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"n": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    s = sorted(samples_ns)
    n = len(s)

    def pick(q: float) -> float:
        return s[min(n - 1, int(q * n))] / 1000.0

    return {
        "n": n,
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "mean": sum(s) / n / 1000.0,
    }


def run_latency(port: int, request: bytes, duration: float, gap: float) -> dict[str, object]:
    sock = _connect(port)
    reader = ResponseReader()
    samples: list[int] = []
    errors = non2xx = 0
    deadline = time.monotonic() + duration
    recv = sock.recv
    while time.monotonic() < deadline:
        t0 = _ns()
        sock.sendall(request)
        while True:
            data = recv(65536)
            if not data:
                errors += 1
                sock.close()
                sock, reader = _connect(port), ResponseReader()
                recv = sock.recv
                break
            if reader.feed(data):
                samples.append(_ns() - t0)
                if not 200 <= reader.status < 300:
                    non2xx += 1
                break
        if reader.close_after:
            sock.close()
            sock, reader = _connect(port), ResponseReader()
            recv = sock.recv
        if gap:
            time.sleep(gap)
    sock.close()
    return {"latency_us": _percentiles(samples), "errors": errors, "non2xx": non2xx}


def run_sse(port: int, request: bytes, duration: float) -> dict[str, object]:
    sock = _connect(port)
    reader = ResponseReader()
    first: list[int] = []
    total: list[int] = []
    errors = non2xx = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        t0 = _ns()
        sock.sendall(request)
        seen_first = False
        pending = b""
        while True:
            data = sock.recv(65536)
            if not data:
                errors += 1
                sock.close()
                sock, reader = _connect(port), ResponseReader()
                break
            if not seen_first:
                pending += data
                end = pending.find(b"\r\n\r\n")
                if end >= 0 and b"data:" in pending[end:]:
                    first.append(_ns() - t0)
                    seen_first = True
            if reader.feed(data):
                total.append(_ns() - t0)
                if not 200 <= reader.status < 300:
                    non2xx += 1
                break
    sock.close()
    return {
        "first_chunk_us": _percentiles(first),
        "total_us": _percentiles(total),
        "errors": errors,
        "non2xx": non2xx,
    }


class _Stream:
    """One connection of the C{streams} mode and the stream in flight on it."""

    __slots__ = ("events", "head", "reader", "seen_first", "sock", "started", "streams", "tail")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = ResponseReader()
        self.streams = 0  # streams started on this connection
        self.started = 0
        self.seen_first = False
        self.head = b""  # the response so far, until the first event is seen
        self.events = 0
        self.tail = b""  # last bytes of the previous read: a "data:" may straddle two

    def begin(self, request: bytes) -> None:
        self.streams += 1
        self.started = _ns()
        self.seen_first = False
        self.head = self.tail = b""
        self.events = 0
        self.sock.send(request)


def run_streams(
    port: int,
    request: bytes,
    duration: float,
    concurrency: int,
    rounds: int,
    stagger: float,
    expect_events: int,
) -> dict[str, object]:
    ep = select.epoll()
    conns: dict[int, _Stream] = {}
    first: list[int] = []
    total: list[int] = []
    completed = events = errors = non2xx = short = sent = 0
    # Every connection is made before the clock starts: a connect that waits
    # (a SYN dropped by a full accept queue is resent after 1 s) must not
    # bunch up the staggered starts behind it.
    fresh = [_Stream(_connect(port)) for _ in range(concurrency)]
    t0 = time.monotonic()
    deadline = t0 + duration
    cutoff = deadline + stagger + 60.0  # nothing may hang the benchmark
    # Connections not started yet, with when their first stream starts.
    waiting = [(t0 + stagger * i / concurrency, st) for i, st in enumerate(fresh)]
    waiting.reverse()  # popped from the end, earliest first

    def due(st: _Stream) -> bool:
        return st.streams < rounds if rounds else time.monotonic() < deadline

    def start(st: _Stream) -> None:
        nonlocal sent
        st.sock.setblocking(False)
        conns[st.sock.fileno()] = st
        ep.register(st.sock.fileno(), select.EPOLLIN)
        st.begin(request)
        sent += 1

    def drop(fd: int, st: _Stream) -> None:
        ep.unregister(fd)
        del conns[fd]
        st.sock.close()

    def reopen(st: _Stream) -> None:
        fresh = _Stream(_connect(port))
        fresh.streams = st.streams
        start(fresh)

    while (waiting or conns) and time.monotonic() < cutoff:
        now = time.monotonic()
        while waiting and waiting[-1][0] <= now:
            start(waiting.pop()[1])
        timeout = max(0.0, waiting[-1][0] - now) if waiting else 0.5
        for fd, _mask in ep.poll(timeout):
            st = conns[fd]
            try:
                data = st.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1  # closed mid-stream
                drop(fd, st)
                if due(st):
                    reopen(st)
                continue
            if not st.seen_first:
                st.head += data
                end = st.head.find(b"\r\n\r\n")
                if end >= 0 and b"data:" in st.head[end:]:
                    first.append(_ns() - st.started)
                    st.seen_first = True
                    st.head = b""
            both = st.tail + data
            n = both.count(b"data:")
            st.events += n
            events += n
            st.tail = both[-4:]  # shorter than "data:": never counted twice
            if not st.reader.feed(data):
                continue
            total.append(_ns() - st.started)
            completed += 1
            if not 200 <= st.reader.status < 300:
                non2xx += 1
            if expect_events and st.events != expect_events:
                short += 1
            if st.reader.close_after:
                drop(fd, st)
                if due(st):
                    reopen(st)
            elif due(st):
                st.begin(request)
                sent += 1
            else:
                drop(fd, st)
    unfinished = len(conns) + len(waiting)
    for st in [*conns.values(), *(w[1] for w in waiting)]:
        st.sock.close()
    elapsed = time.monotonic() - t0
    return {
        "first_chunk_us": _percentiles(first),
        "total_us": _percentiles(total),
        "streams_completed": completed,
        "requests": sent,
        "events": events,
        "events_per_s": events / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "short_streams": short,
        "unfinished": unfinished,
        "errors": errors + unfinished,
        "non2xx": non2xx,
    }


def run_throughput(
    port: int,
    request: bytes,
    duration: float,
    concurrency: int,
    warmup: float,
    gap: float = 0.0,
    drain: bool = False,
) -> dict[str, object]:
    """C{concurrency} keep-alive connections, each sending its next request
    as soon as a response is complete, or C{gap} seconds later (paced load).
    With C{drain}, the responses in flight at the end are waited for (up to
    10 s) rather than cut off, so every request sent has its answer."""
    ep = select.epoll()
    due: list[tuple[float, int]] = []  # (when, fd): paced connections' next send
    socks: dict[int, socket.socket] = {}
    readers: dict[int, ResponseReader] = {}
    started: dict[int, int] = {}
    for _ in range(concurrency):
        s = _connect(port)
        s.setblocking(False)
        fd = s.fileno()
        socks[fd] = s
        readers[fd] = ResponseReader()
        ep.register(fd, select.EPOLLIN)
    samples: list[int] = []
    idle: set[int] = set()  # connections with no request in flight (after the deadline)
    completed = total = errors = non2xx = sent = 0
    now = time.monotonic()
    measure_from = now + warmup
    deadline = measure_from + duration
    measuring = False
    t_start = 0.0
    for fd, s in socks.items():
        started[fd] = _ns()
        s.send(request)
        sent += 1
    while True:
        now = time.monotonic()
        if not measuring and now >= measure_from:
            measuring = True
            t_start = now
            completed = 0
            samples.clear()
        if now >= deadline:
            idle.update(fd for _when, fd in due)  # paced, nothing in flight
            due.clear()
            if not drain or len(idle) >= len(socks) or now >= deadline + 10.0:
                break
        while due and due[0][0] <= now:
            fd = heapq.heappop(due)[1]
            if fd in socks:
                started[fd] = _ns()
                socks[fd].send(request)
                sent += 1
        timeout = min(0.5, max(0.0, due[0][0] - now)) if due else 0.5
        for fd, _mask in ep.poll(timeout):
            s = socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            reader = readers[fd]
            if not data:
                errors += 1
                ep.unregister(fd)
                s.close()
                del socks[fd]
                ns = _connect(port)
                ns.setblocking(False)
                nfd = ns.fileno()
                socks[nfd] = ns
                readers[nfd] = ResponseReader()
                ep.register(nfd, select.EPOLLIN)
                started[nfd] = _ns()
                ns.send(request)
                sent += 1
                continue
            n = reader.feed(data)
            if n:
                t = _ns()
                samples.append(t - started[fd])
                completed += n
                total += n
                if not 200 <= reader.status < 300:
                    non2xx += 1
                if time.monotonic() >= deadline:
                    idle.add(fd)
                elif gap > 0:
                    heapq.heappush(due, (time.monotonic() + gap, fd))
                else:
                    started[fd] = t
                    s.send(request)
                    sent += 1
    elapsed = min(time.monotonic(), deadline) - t_start
    for s in socks.values():
        s.close()
    return {
        "rps": completed / elapsed if elapsed > 0 else 0.0,
        "completed": completed,
        "completed_total": total,
        "requests": sent,
        "seconds": elapsed,
        "latency_us": _percentiles(samples),
        "errors": errors,
        "non2xx": non2xx,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["latency", "throughput", "sse", "streams"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", required=True, help="request bytes, hex-encoded")
    parser.add_argument(
        "--duration",
        type=float,
        default=2.0,
        help="seconds; streams: new streams start until then (--rounds 0), and the run"
        " is cut at duration + stagger + 60 s whatever happens",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="idle seconds between requests (latency; throughput: per connection)",
    )
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="streams: streams per connection (0: --duration)"
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="streams: spread the first requests (s)"
    )
    parser.add_argument(
        "--expect-events",
        type=int,
        default=0,
        help="streams: data: events a whole stream has (others are counted as short)",
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="throughput: wait for the responses in flight at the end (up to 10 s)",
    )
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    request = bytes.fromhex(args.request)
    cpu0 = os.times()
    if args.mode == "latency":
        result = run_latency(args.port, request, args.duration, args.gap)
    elif args.mode == "sse":
        result = run_sse(args.port, request, args.duration)
    elif args.mode == "streams":
        result = run_streams(
            args.port,
            request,
            args.duration,
            args.concurrency,
            args.rounds,
            args.stagger,
            args.expect_events,
        )
    else:
        result = run_throughput(
            args.port, request, args.duration, args.concurrency, args.warmup, args.gap, args.drain
        )
    cpu1 = os.times()
    result["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
