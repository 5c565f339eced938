"""The dashboard's login in a real Chromium, over a real collector with keys.

Issue 15: a collector with C{--require-keys} sends the browser to its login
page; a read key of team-a logs in and the page shows team-a's calls only
(totals equal the store's sums for team-a) though team-b's are stored too;
logout ends it. A wrong key is refused on the form, a key revoked while the
collector runs sends its open page back to the login within seconds, and a
form posted from another origin is refused. The cookie is never the key,
and no key reaches either process's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.browser import launched_chromium, require_browser
from support.clients import chat_calls, chat_request, raw_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess, loopback_env
from support.upstreams import RecordingUpstream

from llmobserve.collector import EventStore

pytestmark = pytest.mark.timeout(180)

#: Generous: only so that a broken page fails rather than hangs.
WAIT_MS = 15_000


def _cli(*args: str) -> str:
    """C{llmobserve ARGS}; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=loopback_env(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _new_key(db: Path, name: str, project: str, scope: str) -> str:
    out = _cli("keys", "create", "--name", name, "--project", project, "--scope", scope,
               "--db", str(db))  # fmt: skip
    return out.splitlines()[-1]


def _stored(url: str, key: str, calls: int) -> None:
    request = urllib.request.Request(
        url + "/api/summary", headers={"Authorization": f"Bearer {key}"}
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=5) as response:
            if json.loads(response.read())["calls"] >= calls:
                return
        time.sleep(0.05)
    raise AssertionError(f"{calls} calls were not stored at {url} in time")


def _wait_value(page: Any, selector: str, value: str) -> None:
    page.wait_for_function(
        "([s, v]) => { const e = document.querySelector(s); return e && e.dataset.value === v; }",
        arg=[selector, value],
        timeout=WAIT_MS,
    )


def _log_in(page: Any, url: str, key: str) -> None:
    page.goto(url + "/dashboard")
    page.wait_for_url("**/dashboard/login", timeout=WAIT_MS)
    page.fill("#login-key", key)
    page.click("#login-submit")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with launched_chromium(require_browser()) as browser:
        yield browser


def test_a_read_key_logs_in_sees_its_project_and_logs_out(chromium: Any, tmp_path: Path) -> None:
    """Login with a read key of team-a: team-a's totals (the store's sums
    for team-a), not team-b's; the cookie is HttpOnly, SameSite=Strict and
    not the key; logout returns to the login and the page is closed again.
    A wrong key stays on the form; a revoked key's open page returns to the
    login within seconds; a cross-site post is refused; no key in any log."""
    db = tmp_path / "collector.db"
    ingest_a = _new_key(db, "proxy-a", "team-a", "ingest")
    ingest_b = _new_key(db, "proxy-b", "team-b", "ingest")
    admin = _new_key(db, "admin", "default", "admin")
    read_a = _new_key(db, "reader-a", "team-a", "read")
    doomed = _new_key(db, "reader-doomed", "team-a", "read")
    with (
        RecordingUpstream() as upstream,
        CollectorProcess(["--require-keys"], db=db, workdir=tmp_path / "collector") as collector,
    ):
        url = collector.url
        logs: list[str] = []
        for name, key, calls in (("a", ingest_a, 3), ("b", ingest_b, 2)):
            args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"]
            args += ["--collector", url, "--collector-key", key]
            with ProxyProcess(args, workdir=tmp_path / name) as proxy:
                chat_calls(proxy.port, upstream.url, calls)
                _stored(url, admin, 3 if name == "a" else 5)
                logs.append(proxy.log_text())
        store = EventStore(db)
        try:
            (team_a,) = store.report([], project="team-a")
        finally:
            store.close()
        assert team_a["calls"] == 3

        context = chromium.new_context()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # a wrong key: the form again, with why
        _log_in(page, url, "llmo_" + "w" * 43)
        page.wait_for_selector("#login-error")
        assert "not known" in page.inner_text("#login-error")
        assert context.cookies() == []

        # the read key: team-a's calls only
        _log_in(page, url, read_a)
        page.wait_for_url(url + "/dashboard", timeout=WAIT_MS)
        _wait_value(page, "#total-calls", "3")
        assert float(str(page.get_attribute("#total-cost", "data-value"))) == pytest.approx(
            team_a["cost_usd"]
        )
        assert page.get_attribute("#tokens-in", "data-value") == str(team_a["input_tokens"])
        page.screenshot(path=tmp_path / "logged-in.png", full_page=True)
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        assert cookie["value"] not in (read_a, "") and read_a not in cookie["value"]
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script sees it

        # logout: back to the form, and the page is closed again
        page.click("#logout-button")
        page.wait_for_url("**/dashboard/login", timeout=WAIT_MS)
        assert context.cookies() == []
        page.goto(url + "/dashboard")
        page.wait_for_url("**/dashboard/login", timeout=WAIT_MS)

        # a key revoked while its page is open: back to the login within seconds
        _log_in(page, url, doomed)
        page.wait_for_url(url + "/dashboard", timeout=WAIT_MS)
        _wait_value(page, "#total-calls", "3")
        assert "revoked" in _cli("keys", "revoke", "reader-doomed", "--db", str(db))
        page.wait_for_url("**/dashboard/login", timeout=WAIT_MS)

        # a form posted from another origin (here: a page of no origin)
        page.goto("about:blank")
        page.set_content(
            f'<form method="post" action="{url}/dashboard/login">'
            f'<input name="key" value="{read_a}"><button id="go">go</button></form>'
        )
        with page.expect_navigation(timeout=WAIT_MS):
            page.click("#go")
        assert "forbidden" in page.content()
        assert context.cookies() == []
        context.close()
        assert errors == []
        logs.append(collector.log_text())
    for key in (ingest_a, ingest_b, admin, read_a, doomed):
        assert not any(key in text for text in logs)


def _keyed_call(port: int, upstream_url: str, key: str) -> None:
    request = chat_request(port, upstream_url)
    head, sep, rest = request.partition(b"\r\n")
    request = head + sep + b"X-LLMObserve-Key: " + key.encode() + b"\r\n" + rest
    assert raw_request(port, request).status == 200


def test_an_embedded_proxy_that_requires_keys_has_the_same_login(
    chromium: Any, tmp_path: Path
) -> None:
    """A proxy with its own store and C{--require-keys}: its dashboard sends
    the browser to the same login; a read key of shop sees shop's calls
    only (not other's), with the cookie; a form from another origin is
    refused; logout closes the page again."""
    db = tmp_path / "proxy.sqlite3"
    shop = _new_key(db, "app-shop", "shop", "ingest")
    other = _new_key(db, "app-other", "other", "ingest")
    read_shop = _new_key(db, "reader-shop", "shop", "read")
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--require-keys", "--db", str(db)]
        args += ["--provider-host", f"127.0.0.1:{upstream.port}=openai"]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            for key, calls in ((shop, 2), (other, 3)):
                for _ in range(calls):
                    _keyed_call(proxy.port, upstream.url, key)
            _stored(proxy.url, read_shop, 2)
            context = chromium.new_context()
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _log_in(page, proxy.url, "llmo_" + "w" * 43)
            page.wait_for_selector("#login-error")
            _log_in(page, proxy.url, read_shop)
            page.wait_for_url(proxy.url + "/dashboard", timeout=WAIT_MS)
            _wait_value(page, "#total-calls", "2")
            (cookie,) = context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert read_shop not in cookie["value"]
            page.click("#logout-button")
            page.wait_for_url("**/dashboard/login", timeout=WAIT_MS)
            page.goto("about:blank")
            page.set_content(
                f'<form method="post" action="{proxy.url}/dashboard/login">'
                f'<input name="key" value="{read_shop}"><button id="go">go</button></form>'
            )
            with page.expect_navigation(timeout=WAIT_MS):
                page.click("#go")
            assert "forbidden" in page.content() and context.cookies() == []
            context.close()
            assert errors == []
            log = proxy.log_text()
    assert not any(key in log for key in (shop, other, read_shop))
