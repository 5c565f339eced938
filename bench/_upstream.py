"""A fast fake OpenAI upstream for the overhead benchmark (its own process).

A single-threaded epoll loop on 127.0.0.1, keep-alive, no HTTP library: it
frames requests (Content-Length or chunked), answers every request with a
canned chat-completion JSON; requests whose target contains C{/sse}
with a short chat-completion SSE stream: the head and the first event at
once, the rest C{--sse-gap} seconds later, so the first event is a chunk
of its own; and requests whose target contains C{/stream} with a long one:
C{--stream-events} events, one chunk and one send each, C{--stream-interval}
seconds apart (or C{interval_ms=N} in the target's query, for that stream;
the head with the first, the usage in the last before C{data: [DONE]},
which goes with the final zero-length chunk).  Prints
C{PORT <n>} on stdout once listening; exits on SIGTERM or EOF.

    python -m bench._upstream [--sse-gap 0.002]
        [--stream-events 200] [--stream-interval 0.01]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from typing import TextIO

_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 9,
            "total_tokens": 28,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": "fp_bench",
    },
    separators=(",", ":"),
).encode()

JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"x-request-id: req_bench\r\n"
    b"openai-processing-ms: 1\r\n"
    b"\r\n%s" % (len(_BODY), _BODY)
)


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_BASE = {"id": "chatcmpl-sse", "object": "chat.completion.chunk", "created": 1700000000}
_MODEL = "gpt-4o-mini-2024-07-18"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
SSE_FIRST = _SSE_HEAD + _chunk(
    _event({**_BASE, "model": _MODEL, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
)
SSE_REST = (
    b"".join(
        _chunk(
            _event(
                {
                    **_BASE,
                    "model": _MODEL,
                    "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}],
                }
            )
        )
        for i in range(3)
    )
    + _chunk(
        _event(
            {
                **_BASE,
                "model": _MODEL,
                "choices": [],
                "usage": {"prompt_tokens": 19, "completion_tokens": 3, "total_tokens": 22},
            }
        )
    )
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)


def stream_sends(events: int) -> list[bytes]:
    """
    The sends of a C{/stream} response, one per event: the head with the
    role event, content events (the last with C{finish_reason}), the usage
    event, and C{data: [DONE]} with the final zero-length chunk.

    @param events: C{data:} events in all, C{[DONE]} included (at least 3).
    """
    if events < 3:
        raise ValueError("a stream has at least 3 events (role, usage, [DONE])")
    base = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": 1700000000}
    content = events - 3
    role = {"index": 0, "delta": {"role": "assistant"}}
    sends = [_SSE_HEAD + _chunk(_event({**base, "model": _MODEL, "choices": [role]}))]
    for i in range(content):
        choice: dict[str, object] = {"index": 0, "delta": {"content": f"tok{i} "}}
        if i == content - 1:
            choice["finish_reason"] = "stop"
        sends.append(_chunk(_event({**base, "model": _MODEL, "choices": [choice]})))
    usage = {"prompt_tokens": 19, "completion_tokens": content, "total_tokens": 19 + content}
    sends.append(_chunk(_event({**base, "model": _MODEL, "choices": [], "usage": usage})))
    sends.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return sends


class _Conn:
    __slots__ = ("buf", "fd", "interval", "need", "out", "sent", "sock", "sse", "stream")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.out = b""
        self.need = -1  # -1: waiting for a head; >=0: body bytes still to skip; -2: chunked
        self.sse = False
        self.stream = False
        self.sent = 0  # sends of the current /stream response made so far
        self.interval = 0.0  # seconds between the current /stream response's events


def _interval(target: bytes, default: float) -> float:
    """The C{interval_ms=N} a request target asks for, in seconds, or C{default}."""
    i = target.find(b"interval_ms=")
    if i < 0:
        return default
    digits = target[i + 12 :].split(b"&", 1)[0].split(b" ", 1)[0]
    return int(digits) / 1000 if digits.isdigit() else default


def serve(
    port_out: TextIO, sse_gap: float, stream_events: int = 200, stream_interval: float = 0.01
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    ep.register(sys.stdin.fileno(), select.EPOLLIN | select.EPOLLHUP)
    conns: dict[int, _Conn] = {}
    # (when, seq, connection): the connection itself, not its fd, so that a
    # timer outliving its connection cannot write to the next one on that fd.
    timers: list[tuple[float, int, _Conn]] = []
    seq = 0
    sends = stream_sends(stream_events)
    print(f"PORT {listener.getsockname()[1]}", file=port_out, flush=True)
    running = [True]

    def stop(*_: object) -> None:
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    # A signal wakes the poll through this pipe: otherwise a retried
    # poll(-1) would sleep on until the next request or EOF.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    ep.register(wake_r, select.EPOLLIN)
    lfd = listener.fileno()
    ifd = sys.stdin.fileno()

    def close(fd: int) -> None:
        conn = conns.pop(fd, None)
        if conn is not None:
            ep.unregister(fd)
            conn.sock.close()

    def send(conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            close(conn.sock.fileno())
            return
        if n < len(data):
            conn.out = data[n:]
            ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def answer(conn: _Conn) -> None:
        nonlocal seq
        if conn.stream:
            send(conn, sends[0])
            conn.sent = 1
            seq += 1
            heapq.heappush(timers, (time.monotonic() + conn.interval, seq, conn))
        elif conn.sse:
            send(conn, SSE_FIRST)
            seq += 1
            heapq.heappush(timers, (time.monotonic() + sse_gap, seq, conn))
        else:
            send(conn, JSON_RESPONSE)

    def consume(conn: _Conn) -> None:
        buf = conn.buf
        while True:
            if conn.need == -1:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                buf = buf[end + 4 :]
                line_end = head.find(b"\r\n")
                target = head[: line_end if line_end >= 0 else len(head)]
                conn.stream = b"/stream" in target
                conn.interval = _interval(target, stream_interval)
                conn.sse = not conn.stream and b"/sse" in target
                i = head.find(b"content-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i)
                    conn.need = int(head[i + 15 : j if j >= 0 else len(head)])
                elif b"transfer-encoding: chunked" in head:
                    conn.need = -2
                else:
                    conn.need = 0
            if conn.need == -2:
                k = buf.find(b"0\r\n\r\n")
                if k < 0:
                    break
                buf = buf[k + 5 :]
                conn.need = 0
            if conn.need > 0:
                take = min(conn.need, len(buf))
                buf = buf[take:]
                conn.need -= take
                if conn.need:
                    break
            conn.need = -1
            answer(conn)
        conn.buf = buf

    while running[0]:
        timeout = -1.0
        if timers:
            timeout = max(0.0, timers[0][0] - time.monotonic())
        try:
            events = ep.poll(timeout)
        except InterruptedError:
            continue
        for fd, mask in events:
            if fd == lfd:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = _Conn(sock)
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            if fd == ifd:
                if not os.read(ifd, 1):
                    running[0] = False
                continue
            if fd == wake_r:
                os.read(wake_r, 64)  # the handler has run: the loop test sees it
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if mask & select.EPOLLOUT and conn.out:
                try:
                    n = conn.sock.send(conn.out)
                except BlockingIOError:
                    n = 0
                except OSError:
                    close(fd)
                    continue
                conn.out = conn.out[n:]
                if not conn.out:
                    ep.modify(fd, select.EPOLLIN)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(fd)
                    continue
                conn.buf += data
                consume(conn)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            when, _, conn = heapq.heappop(timers)
            if conns.get(conn.fd) is not conn:
                continue
            if not conn.stream:
                send(conn, SSE_REST)
                continue
            send(conn, sends[conn.sent])
            conn.sent += 1
            if conn.sent < len(sends):
                # Paced from the planned time, not from now: a late event
                # does not push back the rest of the stream.
                seq += 1
                heapq.heappush(timers, (when + conn.interval, seq, conn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sse-gap", type=float, default=0.002)
    parser.add_argument(
        "--stream-events",
        type=int,
        default=200,
        help="data: events of a /stream response, [DONE] included (at least 3)",
    )
    parser.add_argument(
        "--stream-interval", type=float, default=0.01, help="seconds between /stream events"
    )
    args = parser.parse_args()
    if args.stream_events < 3:
        parser.error("--stream-events must be at least 3")
    serve(sys.stdout, args.sse_gap, args.stream_events, args.stream_interval)


if __name__ == "__main__":
    main()
