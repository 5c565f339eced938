"""Shipping finished sections to the proxy's C{POST /spans}.

Closing a section only appends a dict to a bounded deque: no I/O, no lock
held across a call, nothing that could block an event loop. One daemon
thread posts batches to the proxy, which puts them on the same spool and
collector link as call events. When the proxy is away the spans wait (up to
a bound, counted when dropped) and go on the next attempt.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any

__all__ = ["SpanShipper"]

log = logging.getLogger("llmobserve")

#: Spans kept while the proxy cannot take them; older ones are dropped (counted).
MAX_WAITING = 10_000
BATCH = 500
INTERVAL = 0.5


class SpanShipper:
    """A bounded queue of span records and the thread that posts them."""

    def __init__(self, proxy_url: str, api_key: str | None = None) -> None:
        self.proxy_url = proxy_url.rstrip("/")
        #: sent as C{X-LLMObserve-Key}: a proxy that requires keys for calls
        #: requires one for spans too
        self._headers = {"Content-Type": "application/json"}
        key = (api_key or "").strip()
        if key.isascii() and key.isprintable() and key:
            # what a header can carry (else http.client's error would quote it)
            self._headers["X-LLMObserve-Key"] = key
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.dropped = 0
        self.sent = 0
        self._warned = False
        self._send_lock = threading.Lock()  # one poster at a time: no batch sent twice

    def __call__(self, span: dict[str, Any]) -> None:
        """Queue one finished span (the section sink)."""
        if len(self._queue) >= MAX_WAITING:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(span)
        if self._thread is None or self._pid != os.getpid():
            self._start()
        elif len(self._queue) >= BATCH:
            self._wake.set()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="llmobserve-spans", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = INTERVAL
        while not self._stop:
            self._wake.wait(delay)
            self._wake.clear()
            delay = INTERVAL if self._post_waiting() else min(delay * 2, 10.0)

    def _post_waiting(self, timeout: float = 5.0) -> bool:
        """Post everything waiting, batch by batch; C{False} if the proxy did not take it."""
        with self._send_lock:
            return self._post_locked(timeout)

    def _post_locked(self, timeout: float) -> bool:
        while self._queue:
            batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
            try:
                self._post(batch, timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "llmobserve: could not send sections to %s: %s (will retry)",
                        self.proxy_url,
                        exc,
                    )
                return False
            for _ in batch:
                self._queue.popleft()
            self.sent += len(batch)
        return True

    def _post(self, batch: list[dict[str, Any]], timeout: float) -> None:
        host_port = self.proxy_url.split("://", 1)[1]
        conn = http.client.HTTPConnection(host_port, timeout=timeout)
        try:
            body = json.dumps(batch, separators=(",", ":")).encode()
            conn.request("POST", "/spans", body, self._headers)
            response = conn.getresponse()
            response.read()
            if response.status >= 300:
                hint = (
                    " (a proxy that requires keys needs observe(api_key=...) or LLMOBSERVE_API_KEY)"
                    if response.status == 401
                    else ""
                )
                raise ValueError(f"proxy answered {response.status} to POST /spans{hint}")
        finally:
            conn.close()

    def flush(self, timeout: float = 2.0) -> bool:
        """Send what is waiting now, from the calling thread; C{True} if all went."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if self._post_waiting(timeout=max(0.1, deadline - time.monotonic())):
                return True
            time.sleep(0.05)
        return not self._queue

    def close(self, timeout: float = 2.0) -> None:
        """Flush and stop the thread."""
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            thread.join(timeout)
        self.flush(timeout)
        if self.dropped:
            log.warning(
                "llmobserve: %d section spans were dropped (more than %d waiting to be sent)",
                self.dropped,
                MAX_WAITING,
            )


_current: SpanShipper | None = None


def _at_exit() -> None:
    if _current is not None:
        _current.close()


atexit.register(_at_exit)


def use(shipper: SpanShipper | None) -> None:
    """Make C{shipper} the one flushed at exit (closing the previous one)."""
    global _current
    previous, _current = _current, shipper
    if previous is not None and previous is not shipper:
        previous.close(timeout=0.5)
