"""What the SDK adds on top of the proxy hop itself.

    python -m bench.sdk_overhead [--requests N] [--rounds R] [--lib httpx2,requests] [--json]

Starts the fast fake upstream (C{bench._upstream}) and a real proxy
(C{twistd -n llmobserve}), both on 127.0.0.1, with the launchers of
C{bench.overhead}. For each HTTP library, three arms run in the same
process, interleaved over rounds (the order alternates):

- C{direct}: the client calls the upstream; no proxy, no SDK;
- C{manual}: the client calls the proxy's C{/proxy} with
  C{X-LLMObserve-Target-URL} set by hand; no SDK (the hop alone);
- C{sdk}: C{llmobserve.observe(proxy_url=...)}, the client calls the
  upstream URL with a customer and a two-level section open around the
  loop (so every call carries the full set of context headers); the hook
  routes it.

C{sdk - manual} is what the SDK adds (the claim: nothing measurable);
C{manual - direct} is the proxy hop. Latency is wall time per call
(medians of the per-round p50/p99), CPU is this process's CPU per call.
Opening and closing a section (a span, shipped to the proxy in the
background) is measured on its own (C{section=}). One answer line, e.g.::

    sdk_overhead: httpx2 sdk-manual p50=+21us p99=+35us cpu=+18us/call
      (hop p50=+310us) | requests ... | section=9us (one line in reality)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llmobserve
from bench.overhead import _proxy, _upstream
from llmobserve.sdk import _install

BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
).encode()
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}

Call = Callable[[], None]


def _clients(lib: str, url: str, proxy_url: str) -> tuple[Call, Call, Callable[[], None]]:
    """(call the upstream URL, call the proxy by hand, close)."""
    # The same context headers the SDK sends (fixed values), so the proxy does the
    # same work in both arms and the difference is the client side alone.
    manual_headers = {
        **HEADERS,
        "X-LLMObserve-Target-URL": url,
        "X-LLMObserve-Run-ID": "0123456789abcdef0123456789abcdef",
        "X-LLMObserve-Parent-Span-ID": "0123456789abcdef",
        "X-LLMObserve-Section": "step",
        "X-LLMObserve-Section-Path": "agent/step",
        "X-LLMObserve-Customer-ID": "bench",
        "X-LLMObserve-Span-ID": "fedcba9876543210",
    }
    if lib in ("httpx2", "httpx"):
        mod: Any = __import__(lib)
        client = mod.Client()

        def direct() -> None:
            r = client.post(url, content=BODY, headers=HEADERS)
            assert r.status_code == 200, r.status_code

        def manual() -> None:
            r = client.post(f"{proxy_url}/proxy", content=BODY, headers=manual_headers)
            assert r.status_code == 200, r.status_code

        return direct, manual, client.close
    if lib == "requests":
        import requests

        session = requests.Session()

        def direct_r() -> None:
            r = session.post(url, data=BODY, headers=HEADERS)
            assert r.status_code == 200, r.status_code

        def manual_r() -> None:
            r = session.post(f"{proxy_url}/proxy", data=BODY, headers=manual_headers)
            assert r.status_code == 200, r.status_code

        return direct_r, manual_r, session.close
    raise SystemExit(f"unknown --lib {lib!r} (httpx2, httpx, requests)")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


BATCH = 25


def bench_lib(
    lib: str, up_url: str, up_authority: str, proxy_url: str, n: int, rounds: int
) -> dict[str, Any]:
    """Arms interleaved in batches of C{BATCH} calls, so load swings hit all three alike."""
    url = f"{up_url}/v1/chat/completions"
    direct, manual, close = _clients(lib, url, proxy_url)
    calls = {"direct": direct, "manual": manual, "sdk": direct}
    arms = list(calls)
    rows: dict[str, dict[str, list[float]]] = {
        arm: {"p50": [], "p99": [], "cpu": []} for arm in arms
    }
    llmobserve.observe(proxy_url=proxy_url, provider_hosts={up_authority: "openai"})
    try:
        with llmobserve.customer("bench"), llmobserve.section("agent"), llmobserve.section("step"):
            for fn in (direct, manual):
                for _ in range(50):  # warm the connection pools
                    fn()
            for i in range(rounds):
                times: dict[str, list[float]] = {arm: [] for arm in arms}
                cpu = dict.fromkeys(arms, 0.0)
                for b in range(max(1, n // BATCH)):
                    order = arms if (b + i) % 2 == 0 else arms[::-1]
                    for arm in order:
                        # Hooks in place only for the sdk arm (ROUTER stays configured).
                        if arm == "sdk":
                            _install.install_hooks()
                        else:
                            _install.uninstall_hooks()
                        fn = calls[arm]
                        c0 = time.process_time()
                        for _ in range(BATCH):
                            t0 = time.perf_counter()
                            fn()
                            times[arm].append(time.perf_counter() - t0)
                        cpu[arm] += time.process_time() - c0
                for arm in arms:
                    rows[arm]["p50"].append(_pct(times[arm], 0.5))
                    rows[arm]["p99"].append(_pct(times[arm], 0.99))
                    rows[arm]["cpu"].append(cpu[arm] / len(times[arm]))
                print(
                    f"  {lib} round {i + 1}/{rounds}: "
                    + " ".join(f"{arm} p50={rows[arm]['p50'][-1] * 1e6:.0f}us" for arm in arms),
                    file=sys.stderr,
                )
    finally:
        llmobserve.shutdown()
        close()
    med = {arm: {k: statistics.median(v) * 1e6 for k, v in r.items()} for arm, r in rows.items()}
    return {
        "lib": lib,
        "us": med,
        "sdk_minus_manual": {k: med["sdk"][k] - med["manual"][k] for k in ("p50", "p99", "cpu")},
        "hop": {k: med["manual"][k] - med["direct"][k] for k in ("p50", "p99", "cpu")},
    }


def section_cost(proxy_url: str, n: int = 5000) -> float:
    """Microseconds to open and close one section (its span queued for shipping)."""
    llmobserve.observe(proxy_url=proxy_url)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with llmobserve.section("step"):
                pass
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        llmobserve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sdk_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=1000, help="calls per arm per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lib", default="httpx2,requests")
    parser.add_argument("--json", action="store_true", help="print the full result")
    args = parser.parse_args(argv)
    logging_quiet()
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="llmo-sdkbench-") as tmp,
        _upstream(0.002, stream_events=200, stream_interval=0.01) as (_, up_port),
    ):
        up_authority = f"127.0.0.1:{up_port}"
        with _proxy(Path(tmp), ["--provider-host", f"{up_authority}=openai"]) as (_, px_port):
            for lib in args.lib.split(","):
                results.append(
                    bench_lib(
                        lib.strip(),
                        f"http://{up_authority}",
                        up_authority,
                        f"http://127.0.0.1:{px_port}",
                        args.requests,
                        args.rounds,
                    )
                )
            section_us = section_cost(f"http://127.0.0.1:{px_port}")
    parts = []
    for r in results:
        d, h = r["sdk_minus_manual"], r["hop"]
        parts.append(
            f"{r['lib']} sdk-manual p50={d['p50']:+.0f}us p99={d['p99']:+.0f}us "
            f"cpu={d['cpu']:+.0f}us/call (hop p50={h['p50']:+.0f}us)"
        )
    parts.append(f"section={section_us:.0f}us")
    answer = "sdk_overhead: " + " | ".join(parts)
    if args.json:
        print(
            json.dumps({"answer": answer, "results": results, "section_us": section_us}, indent=2)
        )
    else:
        print(answer)
    return 0


def logging_quiet() -> None:
    import logging

    logging.getLogger("llmobserve").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
