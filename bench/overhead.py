"""What the proxy adds: latency, throughput, CPU per request, SSE, memory.

    python -m bench.overhead [--quick] [--duration S] [--runs N] [--json]
        [--no-streams] [--stream-events N] [--stream-interval S]

Starts three kinds of process on 127.0.0.1 only: a fast fake OpenAI
upstream (C{bench._upstream}), the proxy (C{twistd -n llmobserve} with
C{--allow-cidr 127.0.0.1/32}), and, for each measurement, a lean raw-socket
load generator (C{bench._loadgen}).  Every measurement is made twice in the
same run, straight to the upstream and through the proxy, interleaved (the
order alternates between runs), and the figures are medians over the runs.
With two or more cores the proxy is pinned alone on the last core and the
upstream and load generator share the others.

Prints one answer line, e.g.::

    overhead: c1 added p50=+85us p99=+130us | c64 direct=30100 rps proxied=11200 rps
      | cpu/req=88us | sse first chunk +95us | rss peak 52MB

(one line in reality), then the floor: stock C{twisted.protocols.portforward}
(C{bench._floor}, pinned like the proxy, relaying to the same upstream)
measured in the same runs, and the proxy's figures as ratios to it, e.g.::

    floor: c1 added p50=+157us p99=+210us | c64 12900 rps | cpu/req=61us
      | sse first chunk +75us | ratios: p50 1.5x (<=2.2) rps 0.21x (>=0.40)
      sse 1.9x (<=3.0) cpu 2.8x

with C{--with-bare} a second proxy with C{--no-events} in the same runs::

    bare: c1 added p50=+140us p99=+200us | c64 3900 rps | cpu/req=150us
      | ratios: p99 1.9x (<=2.0) rps 0.30x of floor

(the p99 ratio is the events-on proxy's added p99 to the bare one's),
and unless C{--no-streams} one for 64
concurrent long SSE streams (200 events over 2 s each), e.g.::

    streams: c64 first chunk p50=420us p99=2900us (direct p50=60us p99=700us)
      | cpu/event=22us | events 12800/12800

and with C{--gap-ms 10} a third for c=1 with 10 ms of idle between calls::

    sparse: c1 with 10 ms gaps added p50=+250us p99=+600us

C{--json} prints the full result instead, with the answer lines in
C{"answer"}, C{"floor_answer"}, C{"bare_answer"}, C{"streams_answer"} and
C{"gap_answer"}, the floor's figures in C{"floor"} and the ratios in
C{"ratios_to_floor"}.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ANSWER_RE", "BARE_RE", "FLOOR_RE", "SPARSE_RE", "STREAMS_RE", "TARGETS", "main"]

ROOT = Path(__file__).resolve().parent.parent

ANSWER_RE = re.compile(
    r"^overhead: c1 added p50=(?P<p50>[+-]\d+)us p99=(?P<p99>[+-]\d+)us"
    r" \| c(?P<conc>\d+) direct=(?P<direct>\d+) rps proxied=(?P<proxied>\d+) rps"
    r" \| cpu/req=(?P<cpu>\d+)us \| sse first chunk (?P<sse>[+-]\d+)us"
    r" \| rss peak (?P<rss>\d+)MB(?: \| parsed (?P<parsed>\d+)%)?$"
)

_RATIO = r"(?:\d+\.\d+x|n/a)"
FLOOR_RE = re.compile(
    r"^floor: c1 added p50=(?P<p50>[+-]\d+)us p99=(?P<p99>[+-]\d+)us"
    r" \| c(?P<conc>\d+) (?P<rps>\d+) rps \| cpu/req=(?P<cpu>\d+)us"
    r" \| sse first chunk (?P<sse>[+-]\d+)us"
    rf" \| ratios: p50 (?P<p50_ratio>{_RATIO}) \(<=\d+\.\d\)"
    rf" rps (?P<rps_ratio>{_RATIO}) \(>=\d+\.\d\d\)"
    rf" sse (?P<sse_ratio>{_RATIO}) \(<=\d+\.\d\) cpu (?P<cpu_ratio>{_RATIO})$"
)
BARE_RE = re.compile(
    r"^bare: c1 added p50=(?P<p50>[+-]\d+)us p99=(?P<p99>[+-]\d+)us"
    r" \| c(?P<conc>\d+) (?P<rps>\d+) rps \| cpu/req=(?P<cpu>\d+)us"
    rf" \| ratios: p99 (?P<p99_ratio>{_RATIO}) \(<=\d+\.\d\)"
    rf" rps (?P<rps_ratio>{_RATIO}) of floor$"
)
# PERFORMANCE.md's targets, as ratios to a relay measured in the same run:
# the proxy's (events on) added p50 at c=1, req/s at c=64 and SSE added
# first chunk to the floor's; its c=1 added p99 to the bare proxy's.
TARGETS = {"added_p50": 2.2, "rps": 0.40, "sse_added_first_chunk": 3.0, "added_p99_to_bare": 2.0}

STREAMS_RE = re.compile(
    r"^streams: c(?P<conc>\d+) first chunk p50=(?P<p50>\d+)us p99=(?P<p99>\d+)us"
    r" \(direct p50=(?P<direct_p50>\d+)us p99=(?P<direct_p99>\d+)us\)"
    r" \| cpu/event=(?P<cpu>\d+(?:\.\d)?)us \| events (?P<events>\d+)/(?P<expected>\d+)$"
)
SPARSE_RE = re.compile(
    r"^sparse: c1 with (?P<gap>\d+(?:\.\d+)?) ms gaps added"
    r" p50=(?P<p50>[+-]\d+)us p99=(?P<p99>[+-]\d+)us$"
)

_TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
)
_LISTENING = re.compile(r"llmobserve (proxy|collector) listening on http://([^\s:/]+):(\d+)")

_CHAT_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence, please."},
        ],
        "temperature": 0.2,
        "max_tokens": 32,
    },
    separators=(",", ":"),
).encode()
_SSE_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    separators=(",", ":"),
).encode()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pdeathsig() -> None:
    """In the child: die with the benchmark (Linux), so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except Exception:
        pass


def _request(
    method: str, target: str, host: str, headers: Sequence[tuple[str, str]], body: bytes
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{n}: {v}" for n, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _build_requests(up_port: int, proxy_port: int, route: str) -> dict[str, bytes]:
    common = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Authorization", "Bearer sk-bench-not-a-key"),
        ("User-Agent", "llmobserve-bench/1"),
    ]
    up = f"127.0.0.1:{up_port}"
    px = f"127.0.0.1:{proxy_port}"
    # The upstream answers by target: /v1/chat/completions with JSON,
    # /v1/sse/... with a short SSE stream, /v1/stream/... with a long one.
    paths = {
        "": ("/v1/chat/completions", _CHAT_BODY),
        "_sse": ("/v1/sse/chat/completions", _SSE_BODY),
        "_stream": ("/v1/stream/chat/completions", _SSE_BODY),
    }
    out = {}
    for suffix, (path, body) in paths.items():
        out["direct" + suffix] = _request("POST", path, up, common, body)
        if route == "base-url":
            out["proxied" + suffix] = _request("POST", "/openai" + path, px, common, body)
        else:
            target = [("X-LLMObserve-Target-URL", f"http://{up}{path}")]
            out["proxied" + suffix] = _request("POST", "/proxy", px, target + common, body)
    return out


class _Proc:
    """A child process we own; killed on exit whatever happens."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def main_thread_cpu_seconds(self) -> float:
        """CPU time of the main (reactor) thread alone; the rest is other threads."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def runqueue_wait_seconds(self) -> float:
        """Time all its threads spent runnable but waiting for a CPU
        (C{/proc/PID/task/*/schedstat}): other load on the pinned core."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
        return total / 1e9

    def status_kib(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def _upstream(
    sse_gap: float, stream_events: int, stream_interval: float
) -> Iterator[tuple[_Proc, int]]:
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench._upstream",
            "--sse-gap",
            str(sse_gap),
            "--stream-events",
            str(stream_events),
            "--stream-interval",
            str(stream_interval),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_pdeathsig,
    )
    proc = _Proc(popen)
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench upstream did not start: {line!r}")
        yield proc, int(line.split()[1])
    finally:
        proc.stop()


@contextmanager
def _floor(up_port: int) -> Iterator[tuple[_Proc, int]]:
    """Stock C{twisted.protocols.portforward} to the upstream (C{bench._floor})."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench._floor", "--upstream-port", str(up_port)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_pdeathsig,
    )
    proc = _Proc(popen)
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench floor (portforward) did not start: {line!r}")
        yield proc, int(line.split()[1])
    finally:
        proc.stop()


@contextmanager
def _proxy(
    workdir: Path, extra: Sequence[str], log_name: str | None = None
) -> Iterator[tuple[_Proc, int]]:
    """C{twistd -n llmobserve} on a free port; a second one in the same
    C{workdir} needs its own C{log_name} (its log and C{LLMOBSERVE_HOME})."""
    with _twistd(
        workdir,
        "llmobserve",
        ["--port", "tcp:0:interface=127.0.0.1", "--allow-cidr", "127.0.0.1/32", *extra],
        log_name=log_name,
    ) as started:
        yield started


@contextmanager
def _collector(workdir: Path) -> Iterator[tuple[_Proc, int]]:
    """A collector (C{twistd -n llmobserve-collector}) with its store in C{workdir}."""
    with _twistd(
        workdir,
        "llmobserve-collector",
        ["--port", "tcp:0:interface=127.0.0.1", "--db", str(workdir / "collector.db")],
    ) as started:
        yield started


@contextmanager
def _twistd(
    workdir: Path, plugin: str, args: Sequence[str], log_name: str | None = None
) -> Iterator[tuple[_Proc, int]]:
    log_path = workdir / f"{log_name or plugin}.log"
    env = dict(os.environ)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
        env.pop(name.upper(), None)
    env["LLMOBSERVE_HOME"] = str(workdir / ("home" if log_name is None else f"home-{log_name}"))
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TWISTD,
                "--pidfile=",
                "-n",
                plugin,
                *args,
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig,
        )
    proc = _Proc(popen)
    try:
        deadline = time.monotonic() + 20
        while True:
            text = log_path.read_text(errors="replace")
            m = _LISTENING.search(text)
            if m:
                break
            if popen.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-20:])
                raise RuntimeError(f"{plugin} did not start:\n{tail}")
            time.sleep(0.02)
        yield proc, int(m.group(3))
    finally:
        proc.stop()


def _proxy_metrics(port: int) -> dict[str, float]:
    """The proxy's own C{GET /metrics} samples, by name (empty if unreachable)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return {}
    samples = {}
    for line in data.partition(b"\r\n\r\n")[2].decode("latin-1").splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#"):
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


def _settle(proxy: _Proc, port: int, limit: float = 15.0) -> dict[str, float]:
    """Wait until the proxy has turned every call into a stored event.

    Under load the parse pool queues (or, when full, skips) work that the
    proxy does after the load generator stops: CPU per request is only
    honest once that work is done. Returns the last metrics seen.
    """
    deadline = time.monotonic() + limit
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        now = _proxy_metrics(port)
        if "llmobserve_events_total" not in now:
            return now  # --no-events: nothing deferred
        if (
            now.get("llmobserve_events_waiting", 0.0) == 0.0
            and last
            and now["llmobserve_events_total"] == last["llmobserve_events_total"]
        ):
            return now
        last = now
        time.sleep(0.1)
    return last


def _loadgen(
    mode: str,
    port: int,
    request: bytes,
    duration: float,
    cpus: set[int] | None,
    **opts: Any,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench._loadgen",
        mode,
        "--port",
        str(port),
        "--request",
        request.hex(),
        "--duration",
        str(duration),
    ]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if cpus:
        cmd += ["--cpus", ",".join(map(str, sorted(cpus)))]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        timeout=duration + 30,
        check=False,
        preexec_fn=_pdeathsig,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _wrk_throughput(
    port: int,
    request: bytes,
    duration: float,
    concurrency: int,
    cpus: set[int] | None,
    workdir: Path,
) -> dict[str, Any]:
    """Requests/s with Debian's C{wrk} (same request bytes, as a Lua script)."""
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [line.split(": ", 1) for line in lines[1:]]
    lua = [f"wrk.method = {json.dumps(method)}", f"wrk.body = {json.dumps(body.decode())}"]
    for name, value in headers:
        if name.lower() not in ("content-length", "host"):
            lua.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    script = workdir / "wrk.lua"
    script.write_text("\n".join(lua) + "\n")
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{target}",
    ]
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_pdeathsig
    )
    if cpus:
        os.sched_setaffinity(popen.pid, cpus)
    out, _ = popen.communicate(timeout=duration + 30)
    text = out.decode()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if not rps or not total:
        raise RuntimeError(f"could not read wrk output:\n{text}")
    return {
        "rps": float(rps.group(1)),
        "completed_total": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "errors": 0,
        "cpu_s": 0.0,
    }


@contextmanager
def _workdir(keep: str | None) -> Iterator[str]:
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix="llmo-bench-") as tmp:
            yield tmp


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of C{pid} (affinity is per thread; new ones inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def _streams(
    args: argparse.Namespace, port: int, request: bytes, proxy: _Proc, cpus: set[int] | None
) -> dict[str, Any]:
    """
    One C{streams} phase: C{--concurrency} long SSE streams in flight at
    once, with the proxy's CPU over the phase (divided by the events
    relayed, the CPU per event; meaningful for the proxied phase only).
    """
    p0, m0 = proxy.cpu_seconds(), proxy.main_thread_cpu_seconds()
    t0 = time.monotonic()
    result = _loadgen(
        "streams",
        port,
        request,
        args.streams_stagger + args.streams_rounds * args.stream_seconds,
        cpus,
        concurrency=args.concurrency,
        rounds=args.streams_rounds,
        stagger=args.streams_stagger,
        expect_events=args.stream_events,
    )
    result["wall_s"] = time.monotonic() - t0
    result["proxy_cpu_s"] = proxy.cpu_seconds() - p0
    result["proxy_main_thread_cpu_s"] = proxy.main_thread_cpu_seconds() - m0
    return result


def _streams_summary(
    args: argparse.Namespace, phases: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    direct, proxied = phases["streams_direct"], phases["streams_proxied"]

    def med(rs: list[dict[str, Any]], field: str, q: str) -> float:
        return _median([r[field][q] for r in rs])

    def per_event(r: dict[str, Any], key: str) -> float:
        return float(r[key]) / max(1, int(r["events"])) * 1e6

    cpu = _median([per_event(r, "proxy_cpu_s") for r in proxied])
    reactor = _median([per_event(r, "proxy_main_thread_cpu_s") for r in proxied])
    return {
        "concurrency": args.concurrency,
        "events_per_stream": args.stream_events,
        "interval_s": args.stream_interval,
        "stagger_s": args.streams_stagger,
        "rounds": args.streams_rounds,
        "expected_events": args.concurrency * args.streams_rounds * args.stream_events,
        "direct_first_chunk_p50_us": med(direct, "first_chunk_us", "p50"),
        "direct_first_chunk_p99_us": med(direct, "first_chunk_us", "p99"),
        "proxied_first_chunk_p50_us": med(proxied, "first_chunk_us", "p50"),
        "proxied_first_chunk_p99_us": med(proxied, "first_chunk_us", "p99"),
        "direct_stream_p99_us": med(direct, "total_us", "p99"),
        "proxied_stream_p99_us": med(proxied, "total_us", "p99"),
        "proxied_events": _median([r["events"] for r in proxied]),
        "proxied_streams_completed": _median([r["streams_completed"] for r in proxied]),
        "short_streams": sum(r["short_streams"] for r in direct + proxied),
        "cpu_per_event_us": cpu,
        "cpu_per_event_split_us": {
            "reactor_thread": reactor,
            "other_threads": max(0.0, cpu - reactor),  # both in clock ticks: no -0.0
        },
        "proxy_cpu_util": _median([r["proxy_cpu_s"] / r["wall_s"] for r in proxied]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    pin = len(cores) >= 2 and not args.no_pin
    proxy_cpus = {cores[-1]} if pin else None
    other = set(cores[:-1]) if pin else None
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and shutil.which("wrk"))
    if args.loadgen == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--loadgen wrk: wrk is not installed")
    if pin:
        os.sched_setaffinity(0, other)  # type: ignore[arg-type]  # pinned: a set
    phases: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        phases.setdefault(name, []).append(result)

    with (
        _workdir(args.workdir) as tmp,
        _upstream(args.sse_gap, args.stream_events, args.stream_interval) as (upstream, up_port),
        contextlib.ExitStack() as stack,
    ):
        proxy_args = [a.replace("{UP}", str(up_port)) for a in args.proxy_arg]
        bare_args = [*proxy_args, "--no-events"]
        if args.collector:
            collector, col_port = stack.enter_context(_collector(Path(tmp)))
            if pin:
                _pin(collector.pid, other)  # type: ignore[arg-type]  # pinned: a set
            proxy_args += ["--collector", f"http://127.0.0.1:{col_port}"]
        proxy, px_port = stack.enter_context(_proxy(Path(tmp), proxy_args))
        floor, fl_port = stack.enter_context(_floor(up_port))
        # Who serves each key's requests, on which port, with which bytes.
        reqs = _build_requests(up_port, px_port, args.route)
        servers: dict[str, tuple[int, _Proc]] = {
            "direct": (up_port, upstream),
            "proxied": (px_port, proxy),
            "floor": (fl_port, floor),
        }
        for suffix in ("", "_sse", "_stream"):
            reqs["floor" + suffix] = reqs["direct" + suffix]
        if args.with_bare:
            bare, bare_port = stack.enter_context(_proxy(Path(tmp), bare_args, "llmobserve-bare"))
            servers["bare"] = (bare_port, bare)
            bare_reqs = _build_requests(up_port, bare_port, args.route)
            for suffix in ("", "_sse", "_stream"):
                reqs["bare" + suffix] = bare_reqs["proxied" + suffix]
        if pin:
            for key, (_, proc) in servers.items():
                _pin(proc.pid, other if key == "direct" else proxy_cpus)  # type: ignore[arg-type]  # pinned: a set
        rss_idle = proxy.status_kib("VmRSS")
        _log(
            f"bench: upstream :{up_port}, proxy :{px_port} (pid {proxy.pid}), "
            f"floor :{fl_port} (pid {floor.pid}), "
            + (f"bare :{servers['bare'][0]}, " if "bare" in servers else "")
            + f"pinned={sorted(proxy_cpus) if proxy_cpus else 'no'}, "
            f"generator={'wrk' if use_wrk else 'python'}"
        )
        # Warm up every path (pool connections, caches, the store).
        for key, (port, _) in servers.items():
            _loadgen("latency", port, reqs[key], args.warmup, other)
            _loadgen("sse", port, reqs[key + "_sse"], args.warmup / 2, other)
            if key != "direct":
                _loadgen(
                    "throughput",
                    port,
                    reqs[key],
                    args.warmup,
                    other,
                    concurrency=args.concurrency,
                    warmup=0,
                )
        for run_index in range(args.runs):
            order = list(servers) if run_index % 2 == 0 else list(reversed(servers))
            for key in order:
                port, served_by = servers[key]
                record(f"c1_{key}", _loadgen("latency", port, reqs[key], args.duration, other))
                if args.gap_ms and key in ("direct", "proxied"):
                    record(
                        f"gap_{key}",
                        _loadgen(
                            "latency", port, reqs[key], args.duration, other, gap=args.gap_ms / 1000
                        ),
                    )
                # direct's CPU figures are the (idle) proxy's, as before
                cpu_proc = proxy if key == "direct" else served_by
                if key == "proxied":
                    before = _settle(proxy, px_port)
                p0, u0 = cpu_proc.cpu_seconds(), upstream.cpu_seconds()
                m0 = cpu_proc.main_thread_cpu_seconds()
                w0 = cpu_proc.runqueue_wait_seconds()
                t0 = time.monotonic()
                if use_wrk:
                    tput = _wrk_throughput(
                        port, reqs[key], args.duration, args.concurrency, other, Path(tmp)
                    )
                else:
                    tput = _loadgen(
                        "throughput",
                        port,
                        reqs[key],
                        args.duration,
                        other,
                        concurrency=args.concurrency,
                        warmup=args.c64_warmup,
                    )
                wall = time.monotonic() - t0
                tput["proxy_cpu_s"] = cpu_proc.cpu_seconds() - p0
                tput["proxy_main_thread_cpu_s"] = cpu_proc.main_thread_cpu_seconds() - m0
                tput["upstream_cpu_s"] = upstream.cpu_seconds() - u0
                tput["proxy_runqueue_wait_s"] = cpu_proc.runqueue_wait_seconds() - w0
                tput["wall_s"] = wall
                if key == "proxied":
                    after = _settle(proxy, px_port)
                    # all the work the phase caused, parses after its end included
                    tput["proxy_cpu_settled_s"] = proxy.cpu_seconds() - p0
                    if "llmobserve_events_total" in after:
                        tput["events"] = after["llmobserve_events_total"] - before.get(
                            "llmobserve_events_total", 0.0
                        )
                        tput["parse_skipped"] = after[
                            "llmobserve_parse_skipped_total"
                        ] - before.get("llmobserve_parse_skipped_total", 0.0)
                record(f"c64_{key}", tput)
                record(
                    f"sse_{key}",
                    _loadgen("sse", port, reqs[key + "_sse"], args.sse_duration, other),
                )
                if args.streams and key in ("direct", "proxied"):
                    record(
                        f"streams_{key}", _streams(args, port, reqs[key + "_stream"], proxy, other)
                    )
            c1 = phases["c1_proxied"][-1]["latency_us"]
            _log(
                f"bench: run {run_index + 1}/{args.runs}: c1 proxied p50={c1['p50']:.0f}us, "
                f"c64 proxied={phases['c64_proxied'][-1]['rps']:.0f} rps, "
                f"floor={phases['c64_floor'][-1]['rps']:.0f} rps, "
                f"direct={phases['c64_direct'][-1]['rps']:.0f} rps"
            )
        rss_peak = proxy.status_kib("VmHWM")
        rss_end = proxy.status_kib("VmRSS")
        alive = all(proc.popen.poll() is None for _, proc in servers.values())

    def added(name: str, field: str, q: str, key: str = "proxied") -> float:
        return _median(
            [
                p[field][q] - d[field][q]
                for p, d in zip(phases[f"{name}_{key}"], phases[f"{name}_direct"], strict=True)
            ]
        )

    def per_request_us(key: str) -> float:
        return _median(
            [r["proxy_cpu_s"] / max(1, r["completed_total"]) * 1e6 for r in phases[f"c64_{key}"]]
        )

    def relay_summary(key: str) -> dict[str, Any]:
        """Another relay's figures (the floor, the bare proxy), added against direct."""
        return {
            "added_p50_us": added("c1", "latency_us", "p50", key),
            "added_p99_us": added("c1", "latency_us", "p99", key),
            "rps": _median([r["rps"] for r in phases[f"c64_{key}"]]),
            "cpu_per_request_us": per_request_us(key),
            "sse_added_first_chunk_p50_us": added("sse", "first_chunk_us", "p50", key),
            "c64_cpu_util": _median([r["proxy_cpu_s"] / r["wall_s"] for r in phases[f"c64_{key}"]]),
            "c64_runqueue_wait_share": runqueue_wait_share(key),
        }

    def runqueue_wait_share(key: str) -> float:
        return _median([r["proxy_runqueue_wait_s"] / r["wall_s"] for r in phases[f"c64_{key}"]])

    c64p = phases["c64_proxied"]
    c64d = phases["c64_direct"]
    reactor_per_req = _median(
        [r["proxy_main_thread_cpu_s"] / max(1, r["completed_total"]) * 1e6 for r in c64p]
    )
    cpu_per_req = _median(
        [r["proxy_cpu_settled_s"] / max(1, r["completed_total"]) * 1e6 for r in c64p]
    )
    cpu_in_phase = _median([r["proxy_cpu_s"] / max(1, r["completed_total"]) * 1e6 for r in c64p])
    parsed_share = (
        _median([1 - r["parse_skipped"] / max(1.0, r["events"]) for r in c64p])
        if all("events" in r for r in c64p)
        else None
    )
    proxy_util = _median([r["proxy_cpu_s"] / r["wall_s"] for r in c64p])
    gen_util = _median([(r["cpu_s"] + r["upstream_cpu_s"]) / r["wall_s"] for r in c64p])
    result: dict[str, Any] = {
        "c1": {
            "direct_p50_us": _median([r["latency_us"]["p50"] for r in phases["c1_direct"]]),
            "direct_p99_us": _median([r["latency_us"]["p99"] for r in phases["c1_direct"]]),
            "proxied_p50_us": _median([r["latency_us"]["p50"] for r in phases["c1_proxied"]]),
            "proxied_p99_us": _median([r["latency_us"]["p99"] for r in phases["c1_proxied"]]),
            "added_p50_us": added("c1", "latency_us", "p50"),
            "added_p99_us": added("c1", "latency_us", "p99"),
        },
        "c64": {
            "concurrency": args.concurrency,
            "generator": "wrk" if use_wrk else "python",
            "direct_rps": _median([r["rps"] for r in c64d]),
            "proxied_rps": _median([r["rps"] for r in c64p]),
            "proxied_p50_us": _median([r.get("latency_us", {}).get("p50", 0.0) for r in c64p]),
            "proxied_p99_us": _median([r.get("latency_us", {}).get("p99", 0.0) for r in c64p]),
            "proxy_cpu_util": proxy_util,
            "proxy_runqueue_wait_share": runqueue_wait_share("proxied"),
            "generator_and_upstream_cpu_util": gen_util,
            "bound": "proxy" if proxy_util >= 0.85 else "generator/upstream (figure is a floor)",
        },
        "cpu_per_request_us": cpu_per_req,
        "cpu_per_request_during_phase_us": cpu_in_phase,
        "c64_parsed_share": parsed_share,
        "cpu_per_request_split_us": {
            "reactor_thread": reactor_per_req,
            "other_threads": cpu_per_req - reactor_per_req,
        },
        "sse": {
            "direct_first_chunk_p50_us": _median(
                [r["first_chunk_us"]["p50"] for r in phases["sse_direct"]]
            ),
            "proxied_first_chunk_p50_us": _median(
                [r["first_chunk_us"]["p50"] for r in phases["sse_proxied"]]
            ),
            "added_first_chunk_p50_us": added("sse", "first_chunk_us", "p50"),
            "added_first_chunk_p99_us": added("sse", "first_chunk_us", "p99"),
        },
        "rss_kib": {"idle": rss_idle, "peak": rss_peak, "end": rss_end},
        "errors": sum(r.get("errors", 0) for rs in phases.values() for r in rs),
        "non2xx": sum(r.get("non2xx", 0) for rs in phases.values() for r in rs),
        "proxy_alive": alive,
        "runs": args.runs,
        "duration_s": args.duration,
        "pinned": bool(pin),
        "cores": len(cores),
        "phases": phases,
    }
    if args.streams:
        st = result["streams"] = _streams_summary(args, phases)
        result["streams_answer"] = (
            f"streams: c{args.concurrency} first chunk "
            f"p50={st['proxied_first_chunk_p50_us']:.0f}us "
            f"p99={st['proxied_first_chunk_p99_us']:.0f}us "
            f"(direct p50={st['direct_first_chunk_p50_us']:.0f}us "
            f"p99={st['direct_first_chunk_p99_us']:.0f}us) | "
            f"cpu/event={st['cpu_per_event_us']:.1f}us | "
            f"events {st['proxied_events']:.0f}/{st['expected_events']}"
        )
    if args.gap_ms:
        result["c1_gap"] = {
            "gap_ms": args.gap_ms,
            "added_p50_us": added("gap", "latency_us", "p50"),
            "added_p99_us": added("gap", "latency_us", "p99"),
        }
        result["gap_answer"] = (
            f"sparse: c1 with {args.gap_ms:g} ms gaps added "
            f"p50={result['c1_gap']['added_p50_us']:+.0f}us "
            f"p99={result['c1_gap']['added_p99_us']:+.0f}us"
        )
    fl = result["floor"] = relay_summary("floor")
    ratios = result["ratios_to_floor"] = {
        "added_p50": _ratio(result["c1"]["added_p50_us"], fl["added_p50_us"]),
        "rps": _ratio(result["c64"]["proxied_rps"], fl["rps"]),
        "sse_added_first_chunk": _ratio(
            result["sse"]["added_first_chunk_p50_us"], fl["sse_added_first_chunk_p50_us"]
        ),
        "cpu_per_request": _ratio(cpu_per_req, fl["cpu_per_request_us"]),
    }
    result["targets"] = dict(TARGETS)
    result["floor_answer"] = (
        f"floor: c1 added p50={fl['added_p50_us']:+.0f}us p99={fl['added_p99_us']:+.0f}us"
        f" | c{args.concurrency} {fl['rps']:.0f} rps"
        f" | cpu/req={fl['cpu_per_request_us']:.0f}us"
        f" | sse first chunk {fl['sse_added_first_chunk_p50_us']:+.0f}us"
        f" | ratios: p50 {_times(ratios['added_p50'])} (<={TARGETS['added_p50']:.1f})"
        f" rps {_times(ratios['rps'], 2)} (>={TARGETS['rps']:.2f})"
        f" sse {_times(ratios['sse_added_first_chunk'])} (<={TARGETS['sse_added_first_chunk']:.1f})"
        f" cpu {_times(ratios['cpu_per_request'])}"
    )
    if args.with_bare:
        br = result["bare"] = relay_summary("bare")
        br["ratios"] = {
            "events_added_p99_to_bare": _ratio(result["c1"]["added_p99_us"], br["added_p99_us"]),
            "rps_to_floor": _ratio(br["rps"], fl["rps"]),
        }
        result["bare_answer"] = (
            f"bare: c1 added p50={br['added_p50_us']:+.0f}us p99={br['added_p99_us']:+.0f}us"
            f" | c{args.concurrency} {br['rps']:.0f} rps"
            f" | cpu/req={br['cpu_per_request_us']:.0f}us"
            f" | ratios: p99 {_times(br['ratios']['events_added_p99_to_bare'])}"
            f" (<={TARGETS['added_p99_to_bare']:.1f})"
            f" rps {_times(br['ratios']['rps_to_floor'], 2)} of floor"
        )
    result["answer"] = (
        f"overhead: c1 added p50={result['c1']['added_p50_us']:+.0f}us "
        f"p99={result['c1']['added_p99_us']:+.0f}us | c{args.concurrency} "
        f"direct={result['c64']['direct_rps']:.0f} rps "
        f"proxied={result['c64']['proxied_rps']:.0f} rps | cpu/req={cpu_per_req:.0f}us | "
        f"sse first chunk {result['sse']['added_first_chunk_p50_us']:+.0f}us | "
        f"rss peak {rss_peak / 1024:.0f}MB"
        + ("" if parsed_share is None else f" | parsed {parsed_share * 100:.0f}%")
    )
    return result


def _ratio(value: float, floor: float) -> float | None:
    """C{value / floor}, or C{None} when the floor is not positive (noise)."""
    return value / floor if floor > 0 else None


def _times(ratio: float | None, digits: int = 1) -> str:
    return "n/a" if ratio is None else f"{ratio:.{digits}f}x"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Measure what the llmobserve proxy adds over direct calls (loopback only).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds in all: one run, short phases (CI smoke)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measurement phase (default 2; --quick 0.4)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="interleaved direct/proxied runs, medians taken (default 3)",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="also measure c=1 with this idle gap between requests (e.g. 10)",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "python", "wrk"],
        default="auto",
        help="throughput generator: auto (wrk if installed, else python), python, or wrk",
    )
    parser.add_argument(
        "--route",
        choices=["proxy", "base-url"],
        default="proxy",
        help="/proxy + target header (SDK default) or /openai/... base-URL mode",
    )
    parser.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        help="extra option for twistd llmobserve (repeatable)",
    )
    parser.add_argument(
        "--collector",
        action="store_true",
        help="run a collector (twistd llmobserve-collector, on the generator's cores) and point"
        " the proxy's events at it instead of its embedded store",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the proxy's log and store here (default: a temp dir, removed)",
    )
    parser.add_argument(
        "--no-streams",
        dest="streams",
        action="store_false",
        help="skip the concurrent-streams phase (and its answer line)",
    )
    parser.add_argument(
        "--stream-events",
        type=int,
        default=None,
        help="data: events per long stream, [DONE] included (default 200; --quick 40)",
    )
    parser.add_argument(
        "--stream-interval", type=float, default=0.01, help="seconds between events (0.01)"
    )
    parser.add_argument(
        "--streams-stagger",
        type=float,
        default=None,
        help="spread the first requests of the streams phase over this many seconds"
        " (default: a quarter of a stream; 0: all at once)",
    )
    parser.add_argument(
        "--with-bare",
        action="store_true",
        help="also measure a second proxy with --no-events, pinned alike, in the same runs"
        " (its c=1 p99 is the denominator of the events-on p99 target)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.4 if args.quick else 2.0
    args.duration = min(max(args.duration, 0.1), 60.0)
    args.runs = min(max(args.runs, 1), 20)
    args.concurrency = min(max(args.concurrency, 1), 512)
    args.sse_duration = args.duration / 2
    args.warmup = 0.2 if args.quick else 0.5
    args.c64_warmup = 0.1 if args.quick else 0.3
    args.sse_gap = 0.002
    if args.stream_events is None:
        args.stream_events = 40 if args.quick else 200
    args.stream_events = min(max(args.stream_events, 3), 100_000)
    args.stream_interval = min(max(args.stream_interval, 0.0), 1.0)
    args.stream_seconds = (args.stream_events - 1) * args.stream_interval
    if args.streams_stagger is None:
        args.streams_stagger = args.stream_seconds / 4
    args.streams_stagger = min(max(args.streams_stagger, 0.0), 60.0)
    # As many streams per connection as fit in --duration, at least one.
    args.streams_rounds = max(1, round(args.duration / max(args.stream_seconds, 0.01)))
    # The fake upstream speaks OpenAI's API: say so, so that every proxied
    # call is parsed and priced as a real one would be (the full product).
    args.proxy_arg = [*args.proxy_arg, "--provider-host", "127.0.0.1:{UP}=openai"]
    if args.route == "base-url":
        args.proxy_arg += ["--base-url", "openai=http://127.0.0.1:{UP}"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(result["answer"], flush=True)
        for extra in ("floor_answer", "bare_answer", "streams_answer", "gap_answer"):
            if extra in result:
                print(result[extra], flush=True)
    if not result["proxy_alive"]:
        _log("bench: the proxy died during the run")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
