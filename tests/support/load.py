"""The benchmark's load generator (C{bench._loadgen}) for tests: each run its
own process, so that the test process's own work (its threads, its garbage
collector) never reads as the proxy's latency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["HEALTH_REQUEST", "ROOT", "loadgen", "results"]

ROOT = Path(__file__).resolve().parents[2]

#: C{GET /health} as the load generator sends it (its latency is the proxy's
#: event-loop lag, give or take loopback).
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def loadgen(
    mode: str, port: int, request: bytes, seconds: float, *options: str
) -> subprocess.Popen[bytes]:
    """Start C{python -m bench._loadgen MODE} against C{port} for C{seconds}."""
    command = [sys.executable, "-m", "bench._loadgen", mode, "--port", str(port)]
    command += ["--request", request.hex(), "--duration", str(seconds), *options]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def results(*popens: subprocess.Popen[bytes], timeout: float = 120.0) -> list[dict[str, Any]]:
    """The JSON results of load generators started by L{loadgen}; each must exit 0."""
    out = []
    for popen in popens:
        stdout, stderr = popen.communicate(timeout=timeout)
        assert popen.returncode == 0, stderr.decode()[-2000:]
        out.append(json.loads(stdout))
    return out
