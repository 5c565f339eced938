"""The dashboard in a real Chromium, over a real collector and an embedded proxy.

Issue 17: calls made through a real proxy reach a real collector; the page at
C{/} (a redirect to C{/dashboard}) shows totals equal to the store's sums,
switches its window, filters by a customer, opens a call and its run, and
shows a new call without a reload. Every page is screenshotted into the
test's tmp directory; any console error or uncaught exception fails the test.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.browser import launched_chromium, require_browser
from support.clients import proxy_request, raw_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess
from support.upstreams import RecordingUpstream

from llmobserve.collector import EventStore

pytestmark = pytest.mark.timeout(120)

#: Generous: only so that a broken page fails rather than hangs.
WAIT_MS = 15_000


def _call(proxy: ProxyProcess, upstream: RecordingUpstream, **context: str) -> None:
    """One chat completion through the proxy, with context headers."""
    headers = [("Content-Type", "application/json")]
    headers += [(f"X-LLMObserve-{name.replace('_', '-')}", v) for name, v in context.items()]
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    request = proxy_request(
        proxy.port, "POST", upstream.url + "/v1/chat/completions", headers, body
    )
    assert raw_request(proxy.port, request).status == 200


def _calls_stored(url: str, calls: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/api/summary", timeout=5) as response:
            if json.loads(response.read())["calls"] >= calls:
                return
        time.sleep(0.05)
    raise AssertionError(f"{calls} calls were not stored at {url} in time")


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with launched_chromium(require_browser()) as browser:
        yield browser


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


def _value(page: Any, selector: str) -> str:
    return str(page.get_attribute(selector, "data-value"))


def _wait_value(page: Any, selector: str, value: str) -> None:
    page.wait_for_function(
        "([s, v]) => { const e = document.querySelector(s); return e && e.dataset.value === v; }",
        arg=[selector, value],
        timeout=WAIT_MS,
    )


def test_collector_dashboard_in_chromium(
    chromium: Any, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """The collector's dashboard: totals equal the store's sums; window, customer
    filter, call detail and run timeline work; a new call appears without a
    reload; readable at a phone's width; no console error."""
    with (
        CollectorProcess(workdir=tmp_path / "collector") as collector,
        ProxyProcess(
            [
                *LOOPBACK_ARGS,
                "--provider-host",
                f"127.0.0.1:{upstream.port}=openai",
                "--collector",
                collector.url,
            ],
            workdir=tmp_path / "proxy",
        ) as proxy,
    ):
        for customer, section in [
            ("acme", "agent:researcher"),
            ("acme", "agent:researcher/tool:web_search"),
            ("acme", "agent:writer"),
            ("globex", "agent:writer"),
            ("globex", "agent:researcher/tool:web_search"),
        ]:
            _call(proxy, upstream, customer_id=customer, section_path=section, run_id="run-1")
        _calls_stored(collector.url, 5)
        store = EventStore(collector.db)
        try:
            (total,) = store.report([])
        finally:
            store.close()

        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        console = Console(page)
        page.goto(collector.url + "/")
        assert page.url.startswith(collector.url + "/dashboard")
        _wait_value(page, "#total-calls", "5")
        assert total["calls"] == 5
        assert float(_value(page, "#total-cost")) == pytest.approx(total["cost_usd"])
        assert _value(page, "#tokens-in") == str(total["input_tokens"])
        assert _value(page, "#tokens-out") == str(total["output_tokens"])
        assert page.locator("#total-cost").inner_text().startswith("$")
        page.wait_for_selector("#chart svg rect")
        page.screenshot(path=tmp_path / "overview.png", full_page=True)

        # the window: buttons put it in the address
        page.click("#window button[data-since='7d']")
        page.wait_for_url("**since=7d**", timeout=WAIT_MS)
        _wait_value(page, "#total-calls", "5")
        page.goto(collector.url + "/dashboard?since=2020-01-01&until=2020-01-02")
        _wait_value(page, "#total-calls", "0")
        assert (
            page.locator("#window button[data-since='custom']").get_attribute("class") == "active"
        )
        page.goto(collector.url + "/dashboard?since=24h")

        # the section tree nests a tool under its agent; rows link to their calls
        page.click("#group-section")
        page.wait_for_selector("[data-table='breakdown-section'] .tree-1")
        page.click("#group-customer")
        page.click("[data-table='breakdown-customer'] a:text-is('acme')")
        page.wait_for_url("**view=calls**customer=acme**", timeout=WAIT_MS)
        page.wait_for_selector("[data-table='calls'] tbody tr")
        rows = page.locator("[data-table='calls'] tbody tr")
        assert rows.count() == 3
        page.screenshot(path=tmp_path / "calls.png", full_page=True)

        # one call, every field; then its run
        first_id = page.evaluate(
            "new URL(document.querySelector(\"[data-table='calls'] tbody a\").href)"
            ".searchParams.get('id')"
        )
        page.click("[data-table='calls'] tbody tr:first-child a")
        page.wait_for_selector("#call-fields")
        assert page.inner_text("dd[data-field='id']") == first_id
        assert "acme" in page.inner_text("dd[data-field='context']")
        page.screenshot(path=tmp_path / "call.png", full_page=True)
        page.click("#run-link")
        page.wait_for_selector("#timeline .tl-row")
        _wait_value(page, "#run-calls", "5")
        page.screenshot(path=tmp_path / "run.png", full_page=True)

        # live: a new call shows up without a reload
        page.goto(collector.url + "/dashboard?since=1h")
        _wait_value(page, "#total-calls", "5")
        page.evaluate("window.__sameDocument = true")
        _call(proxy, upstream, customer_id="initech")
        _wait_value(page, "#total-calls", "6")
        assert page.evaluate("window.__sameDocument === true")

        # a phone's width: nothing wider than the screen but the scrolling tables
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        _wait_value(page, "#total-calls", "6")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=tmp_path / "overview-phone.png", full_page=True)
        assert console.errors == []


def test_embedded_proxy_serves_the_same_dashboard(
    chromium: Any, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """`make run`'s proxy (events in its own store): opening its address shows
    the dashboard over that store, and a new call appears without a reload.
    A few cheap calls (a few millionths of a dollar, a newcomer's first run)
    put long labels on the cost axis ("$0.0000025"): none is cut at the
    chart's left edge. A call the proxy refused is not one of the calls, and
    the calls card says it was refused (as the report's "refused" line does)."""
    args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
    args += ["--db", str(tmp_path / "events.sqlite3")]
    with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
        # 127.0.0.2 is outside LOOPBACK_ARGS' --allow-cidr: refused, nothing sent
        refused = proxy_request(proxy.port, "POST", "http://127.0.0.2:9/v1/x", [], b"{}")
        assert raw_request(proxy.port, refused).status == 403
        _call(proxy, upstream, customer_id="acme")
        _call(proxy, upstream, customer_id="acme")
        _calls_stored(proxy.url, 2)
        page = chromium.new_page()
        console = Console(page)
        page.goto(proxy.url + "/")
        assert page.url.startswith(proxy.url + "/dashboard")
        _wait_value(page, "#total-calls", "2")
        assert page.inner_text("#summary .card:has(#total-calls) .sub") == (
            "1 refused, not forwarded"
        )
        page.wait_for_selector("#chart svg rect")
        page.screenshot(path=tmp_path / "embedded-overview.png", full_page=True)
        axis = page.evaluate(
            "Array.from(document.querySelectorAll(\"#chart svg text[text-anchor='end']\"))"
            ".map((t) => [t.textContent, t.getBBox().x])"
        )
        assert max(len(label) for label, _ in axis) >= len("$0.0000025"), axis
        assert all(x >= 0 for _, x in axis), axis
        _call(proxy, upstream, customer_id="globex")
        _wait_value(page, "#total-calls", "3")
        page.click("#nav-calls")
        page.wait_for_selector("[data-table='calls'] tbody tr:nth-child(3)")
        assert console.errors == []
