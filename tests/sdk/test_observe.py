"""observe(): arguments and environment, proxy_url=None, disabled, twice, spans, imports."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.upstreams import RecordingUpstream, Response

import llmobserve
from llmobserve.sdk import _context
from llmobserve.sdk._routing import ROUTER

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOBSERVE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=full_env,
    )


def test_importing_llmobserve_does_not_import_twisted() -> None:
    """A fresh interpreter: `import llmobserve` and observe(proxy_url=None) load no Twisted."""
    out = _run(
        """
        import sys, llmobserve
        llmobserve.observe(proxy_url=None)
        with llmobserve.section("s"):
            pass
        print(sorted(m for m in sys.modules if m == "twisted" or m.startswith("twisted.")))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_library_imported_after_observe_is_hooked(fake_proxy: RecordingUpstream) -> None:
    """observe() first, `import httpx` later: the call is still routed (import-time hook)."""
    out = _run(
        f"""
        import sys, llmobserve
        llmobserve.observe(proxy_url={fake_proxy.url!r},
                           provider_hosts={{"127.0.0.1:9": "openai"}})
        assert "httpx" not in sys.modules
        import httpx
        r = httpx.get("http://127.0.0.1:9/v1/models")
        print(r.status_code)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "200"
    [req] = fake_proxy.wait_requests(1)
    assert req.header("X-LLMObserve-Target-URL") == b"http://127.0.0.1:9/v1/models"


def test_env_variables_are_read(
    monkeypatch: pytest.MonkeyPatch, fake_proxy: RecordingUpstream
) -> None:
    monkeypatch.setenv("LLMOBSERVE_PROXY_URL", fake_proxy.url)
    monkeypatch.setenv("LLMOBSERVE_COLLECTOR_URL", "http://collector.test:8000")
    monkeypatch.setenv("LLMOBSERVE_CUSTOMER_ID", "env-cust")
    monkeypatch.setenv("LLMOBSERVE_TENANT_ID", "env-tenant")
    obs = llmobserve.observe()
    assert obs.tracking and obs.proxy_url == fake_proxy.url
    assert obs.collector_url == "http://collector.test:8000"
    h = dict(_context.context_headers())
    assert h["X-LLMObserve-Customer-ID"] == "env-cust"
    assert h["X-LLMObserve-Tenant-ID"] == "env-tenant"
    # The collector itself is never routed.
    assert ROUTER.route("http", "collector.test", 8000) is None
    assert ROUTER.route("https", "api.openai.com", 443) is not None


def test_arguments_win_over_environment(
    monkeypatch: pytest.MonkeyPatch, fake_proxy: RecordingUpstream
) -> None:
    monkeypatch.setenv("LLMOBSERVE_PROXY_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LLMOBSERVE_CUSTOMER_ID", "env-cust")
    obs = llmobserve.observe(proxy_url=fake_proxy.url, customer_id="arg-cust")
    assert obs.proxy_url == fake_proxy.url
    assert dict(_context.context_headers())["X-LLMObserve-Customer-ID"] == "arg-cust"


def test_proxy_url_none_routes_nothing_and_warns_once(
    caplog: pytest.LogCaptureFixture, target: RecordingUpstream
) -> None:
    """proxy_url=None: no routing, one warning that calls are not tracked."""
    import httpx

    with caplog.at_level("WARNING", logger="llmobserve"):
        obs = llmobserve.observe(proxy_url=None, provider_hosts={target.authority: "openai"})
        llmobserve.observe(proxy_url=None, provider_hosts={target.authority: "openai"})
        httpx.post(f"{target.url}/v1/chat/completions", content=b"{}")
    assert obs.tracking is False
    [req] = target.wait_requests(1)
    assert req.target == b"/v1/chat/completions"
    warnings = [r for r in caplog.records if "NOT tracked" in r.getMessage()]
    assert len(warnings) == 1


def test_disabled_by_environment(
    monkeypatch: pytest.MonkeyPatch, fake_proxy: RecordingUpstream
) -> None:
    monkeypatch.setenv("LLMOBSERVE_DISABLED", "1")
    obs = llmobserve.observe(proxy_url=fake_proxy.url)
    assert obs.tracking is False and obs.reason == "disabled"
    assert ROUTER.config is None


def test_calling_twice_is_harmless(
    fake_proxy: RecordingUpstream, target: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The same arguments twice: the same observation, hooks installed once, one request."""
    import httpx

    first = llmobserve.observe(
        proxy_url=fake_proxy.url, provider_hosts={target.authority: "openai"}
    )
    second = llmobserve.observe(
        proxy_url=fake_proxy.url, provider_hosts={target.authority: "openai"}
    )
    assert first is second
    _context.set_span_sink(None)
    httpx.get(f"{target.url}/v1/models")
    assert len(fake_proxy.wait_requests(1)) == 1
    assert target.requests == []


def test_use_instrumentors_changes_nothing_and_says_so(
    caplog: pytest.LogCaptureFixture, fake_proxy: RecordingUpstream
) -> None:
    import llmobserve.sdk._observe as observe_mod

    observe_mod._said_instrumentors = False
    with caplog.at_level("INFO", logger="llmobserve"):
        a = llmobserve.observe(proxy_url=fake_proxy.url, use_instrumentors=True)
        llmobserve.shutdown()
        b = llmobserve.observe(proxy_url=fake_proxy.url, use_instrumentors=True)
    assert a.tracking and b.tracking and a.proxy_url == b.proxy_url
    said = [r for r in caplog.records if "use_instrumentors" in r.getMessage()]
    assert len(said) == 1


def test_sections_are_shipped_to_the_proxy(fake_proxy: RecordingUpstream) -> None:
    """Closed sections reach POST /spans as a JSON array, off the calling thread."""
    fake_proxy.respond_with(
        Response(202, [("Content-Type", "application/json")], b'{"accepted":1}')
    )
    llmobserve.observe(proxy_url=fake_proxy.url)
    with llmobserve.customer("c"), llmobserve.section("outer"), llmobserve.section("inner"):
        pass
    llmobserve.shutdown()  # flushes
    posted = [r for r in fake_proxy.requests if r.target == b"/spans"]
    assert posted, fake_proxy.requests
    spans = [s for r in posted for s in json.loads(r.body)]
    assert [s["section_path"] for s in spans] == ["outer/inner", "outer"]
    assert spans[0]["parent_span_id"] == spans[1]["span_id"]
    assert all(s["customer_id"] == "c" and s["status"] == "ok" for s in spans)
    assert posted[0].header("Content-Type") == b"application/json"


def test_sections_carry_the_key_the_calls_carry(fake_proxy: RecordingUpstream) -> None:
    """observe(api_key=...): a proxy that requires keys for calls requires
    one for spans too, so the shipper sends the same X-LLMObserve-Key."""
    fake_proxy.respond_with(
        Response(202, [("Content-Type", "application/json")], b'{"accepted":1}')
    )
    # read from a file or a secret: a trailing newline, which no header can carry
    llmobserve.observe(proxy_url=fake_proxy.url, api_key="llmo_spans_key\n")
    with llmobserve.section("plan"):
        pass
    llmobserve.shutdown()  # flushes
    posted = [r for r in fake_proxy.requests if r.target == b"/spans"]
    assert posted and all(r.header("X-LLMObserve-Key") == b"llmo_spans_key" for r in posted)


def test_sections_wait_while_proxy_is_down_then_go() -> None:
    """Spans queued while the proxy is unreachable are sent once it is back."""
    from llmobserve.sdk._spans import SpanShipper

    with RecordingUpstream(Response(202, [], b"{}")) as later:
        shipper = SpanShipper("http://127.0.0.1:1")
        shipper._queue.append({"span_id": "a"})
        assert shipper.flush(timeout=0.3) is False
        shipper.proxy_url = later.url
        assert shipper.flush(timeout=2.0) is True
        [req] = later.wait_requests(1)
        assert json.loads(req.body) == [{"span_id": "a"}]


def test_where_it_runs_is_said_even_without_logging_configured(
    fake_proxy: RecordingUpstream,
) -> None:
    """With no logging configured (Python shows only warnings), the one line saying where
    the proxy runs still reaches stderr, once."""
    out = _run(
        f"""
        import llmobserve
        llmobserve.observe(proxy_url={fake_proxy.url!r})
        llmobserve.observe(proxy_url={fake_proxy.url!r})
        """
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "tracking calls through" in line]
    assert lines == [f"llmobserve: tracking calls through the proxy at {fake_proxy.url}"]


def test_failed_auto_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed auto-start is not cached: observe() again tries again."""
    from llmobserve.sdk import _autostart

    calls = []

    def fail(*args: object, **kwargs: object) -> str:
        calls.append(1)
        return "nope"

    monkeypatch.setattr(_autostart, "ensure_proxy", fail)
    assert llmobserve.observe().tracking is False
    assert llmobserve.observe().tracking is False
    assert len(calls) == 2


def test_calls_before_a_background_auto_start_finishes_are_said_untracked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside a running loop, observe() returns before the proxy is found; that calls
    made meanwhile go direct (not tracked) is said at once."""
    import asyncio
    import threading

    from llmobserve.sdk import _autostart

    release = threading.Event()

    def slow(*args: object, **kwargs: object) -> str:
        release.wait(10)
        return "stopped by the test"

    monkeypatch.setattr(_autostart, "ensure_proxy", slow)

    async def main() -> llmobserve.Observation:
        return llmobserve.observe()

    with caplog.at_level("INFO", logger="llmobserve"):
        pending = asyncio.run(main())
    said = [r.getMessage() for r in caplog.records]
    release.set()
    pending.wait(10)
    assert pending.tracking is None
    assert any("calls made until then go direct (not tracked)" in m for m in said)


def test_a_misspelt_provider_id_in_provider_hosts_is_refused() -> None:
    """Issue 14 item 7: observe(provider_hosts=...) refuses an id the registry does not
    know, naming the closest one, before it routes anything."""
    from llmobserve.providers import UnknownProviderError

    with pytest.raises(UnknownProviderError, match="did you mean 'openai'"):
        llmobserve.observe(proxy_url=None, provider_hosts={"127.0.0.1:18080": "opneai"})
    assert ROUTER.config is None


def _found(monkeypatch: pytest.MonkeyPatch, *, started: bool, health: dict[str, Any]) -> None:
    from llmobserve.sdk import _autostart

    def ensure_proxy(*args: object, **kwargs: object) -> _autostart.ProxyFound:
        return _autostart.ProxyFound("http://127.0.0.1:9", started=started, health=health)

    monkeypatch.setattr(_autostart, "ensure_proxy", ensure_proxy)


def test_where_events_go_follows_the_proxys_health(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 item 6: a reused proxy that ships to a collector (/health says
    mode link) is not described as storing events in its embedded store."""
    link = {"collector": {"mode": "link", "url": "http://127.0.0.1:8000", "state": "connected"}}
    _found(monkeypatch, started=False, health=link)
    caplog.set_level(logging.INFO, logger="llmobserve")
    llmobserve.observe()
    said = [r.getMessage() for r in caplog.records if "tracking calls" in r.getMessage()]
    assert said == [
        "llmobserve: tracking calls through the proxy at http://127.0.0.1:9 (already running), "
        "events go to the collector at http://127.0.0.1:8000"
    ]


def test_starting_a_proxy_for_a_collector_url_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 item 5: observe(collector_url=...) that found no proxy and started its
    own says so as a warning (the user's own proxy may have failed to start)."""
    link = {"collector": {"mode": "link", "url": "http://127.0.0.1:8000", "state": "connecting"}}
    _found(monkeypatch, started=True, health=link)
    llmobserve.observe(collector_url="http://127.0.0.1:8000")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("llmobserve: no proxy was running on 127.0.0.1:9000")


def test_a_reused_proxy_with_a_collector_url_is_no_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    link = {"collector": {"mode": "link", "url": "http://127.0.0.1:8000", "state": "connected"}}
    _found(monkeypatch, started=False, health=link)
    llmobserve.observe(collector_url="http://127.0.0.1:8000")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_reused_proxy_shipping_elsewhere_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """observe(collector_url=...) reusing a proxy (one an earlier observe() started,
    still lingering) that stores events itself: the warning says where this
    process's calls are recorded and how to get them to the collector."""
    embedded = {"collector": {"mode": "embedded", "url": "/home/u/.llmobserve/events.sqlite3"}}
    _found(monkeypatch, started=False, health=embedded)
    llmobserve.observe(collector_url="http://127.0.0.1:8000")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(
        "llmobserve: the running proxy ships events to /home/u/.llmobserve/events.sqlite3, "
        "not http://127.0.0.1:8000: this process's calls are recorded there."
    )
    assert "LLMOBSERVE_PROXY_LINGER, 30 s by default" in warning
    assert warning.endswith("start it with --collector http://127.0.0.1:8000")


def test_the_report_command_is_one_the_user_can_type(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The start line said '(llmobserve report)', which is not on PATH after
    make setup and reads the default store only: it names the llmobserve beside
    this Python when none is on PATH, and --db for a store the proxy was given."""
    from llmobserve.paths import default_db_path

    monkeypatch.setattr("llmobserve.sdk._observe.shutil.which", lambda name: None)
    beside = Path(sys.executable).parent / "llmobserve"
    assert beside.exists()
    caplog.set_level(logging.INFO, logger="llmobserve")
    for store, command in [
        (str(default_db_path()), f"{beside} report"),
        (str(tmp_path / "x.sqlite3"), f"{beside} report --db {tmp_path / 'x.sqlite3'}"),
    ]:
        llmobserve.shutdown()
        caplog.clear()
        _found(monkeypatch, started=False, health={"collector": {"mode": "embedded", "url": store}})
        llmobserve.observe()
        [said] = [r.getMessage() for r in caplog.records if "tracking calls" in r.getMessage()]
        assert said.endswith(f"events go to its embedded store ({command})")
