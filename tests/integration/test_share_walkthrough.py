"""README, "Share it with your team": the walkthrough's commands, for real.

The same commands as the README with three substitutions a test needs:
ephemeral ports instead of 8443/9001/9002, the collector on 127.0.0.1 with
C{--require-keys} instead of 0.0.0.0 (keys are required either way; the
suite keeps its traffic on loopback), and a fake OpenAI upstream
(C{--base-url openai=...}) instead of api.openai.com. The app's call is made
as C{curl --resolve llmobserve:PORT:127.0.0.1} would: to 127.0.0.1 with
C{Host: llmobserve:PORT}.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
from support.browser import chromium_path, launched_chromium
from support.clients import build_request, raw_request
from support.proxy import CollectorProcess, ProxyProcess, loopback_env
from support.upstreams import RecordingUpstream

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _run(cwd: Path, *argv: str) -> str:
    """One command of the walkthrough, in its directory; its stdout."""
    env = loopback_env()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, (argv[:3], done.stderr)
    return done.stdout


def _last_line(text: str) -> str:
    return text.splitlines()[-1]


def browser_missing() -> str | None:
    """Why step 7 (a browser) cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed"
    return None if chromium_path() is not None else "no Chromium on the PATH"


def _dashboard_step(url: str, read_key: str) -> None:
    """Step 7: open the dashboard over TLS (the self-signed certificate
    accepted), get sent to its login, paste the read key: team-a's 3 calls,
    with a C{Secure} session cookie that is not the key."""
    path = chromium_path()
    assert path is not None
    with launched_chromium(path) as browser:
        context: Any = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        page.goto(url + "/dashboard")
        page.wait_for_url("**/dashboard/login", timeout=15_000)
        page.fill("#login-key", read_key)
        page.click("#login-submit")
        page.wait_for_function(
            "() => { const e = document.querySelector('#total-calls');"
            " return e && e.dataset.value === '3'; }",
            timeout=15_000,
        )
        (cookie,) = context.cookies()
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert read_key not in cookie["value"]
        context.close()


@pytest.mark.timeout(120)
def test_the_share_it_with_your_team_walkthrough(tmp_path: Path) -> None:
    """TLS collector with keys, two proxies with their projects' keys, an
    app reaching a proxy by its service name, a read key's report showing
    only its project, and (with a Chromium) its dashboard login."""
    d = tmp_path
    # 1. the certificate
    _run(
        d, "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
        "-subj", "/CN=llmobserve-collector",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", "collector-key.pem", "-out", "collector-cert.pem",
    )  # fmt: skip
    # 2. keys with --db
    db = "collector.sqlite3"
    keys = "llmobserve", "keys", "create", "--db", db
    admin = _last_line(_run(d, *keys, "--name", "admin", "--scope", "admin"))
    key_a = _last_line(_run(d, *keys, "--name", "proxy-a", "--project", "team-a"))
    key_b = _last_line(_run(d, *keys, "--name", "proxy-b", "--project", "team-b"))
    assert all(k.startswith("llmo_") for k in (admin, key_a, key_b))
    # 3. the collector
    collector = CollectorProcess(
        ["--require-keys"],
        db=d / db,
        port="ssl:0:interface=127.0.0.1:privateKey=collector-key.pem:certKey=collector-cert.pem",
        workdir=d,
    )
    with RecordingUpstream() as upstream, collector:
        url = f"https://127.0.0.1:{collector.port}"

        # 4. two proxies
        def proxy(spool: str, key: str) -> ProxyProcess:
            return ProxyProcess(
                [
                    "--public-name", "llmobserve", "--spool-dir", str(d / spool),
                    "--collector", url, "--collector-ca-file", str(d / "collector-cert.pem"),
                    "--collector-key", key,
                    "--base-url", f"openai={upstream.url}",
                    "--provider-host", f"127.0.0.1:{upstream.port}=openai",
                ],
                workdir=d / spool.replace("spool", "proxy"),
            )  # fmt: skip

        with proxy("spool-a", key_a) as a, proxy("spool-b", key_b) as b:
            # 5. the app, by the service name (curl --resolve llmobserve:PORT:127.0.0.1)
            for p, n in ((a, 3), (b, 2)):
                for _ in range(n):
                    body = (
                        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
                    )
                    request = build_request(
                        "POST",
                        "/openai/v1/chat/completions",
                        [("Authorization", "Bearer sk-test"), ("Content-Type", "application/json")],
                        body,
                        host=f"llmobserve:{p.port}",
                    )
                    assert raw_request(p.port, request).status == 200
            deadline = time.monotonic() + 20
            while any(
                json.loads(urllib.request.urlopen(p.url + "/health", timeout=5).read())[
                    "events_waiting"
                ]
                for p in (a, b)
            ):
                assert time.monotonic() < deadline, "events not delivered"
                time.sleep(0.05)
        # 6. a read key over the API, and its report
        tls = "--collector", url, "--ca-file", "collector-cert.pem"
        read_a = _last_line(
            _run(
                d,
                "llmobserve",
                "keys",
                "create",
                *tls,
                "--key",
                admin,
                "--name",
                "reader-a",
                "--project",
                "team-a",
                "--scope",
                "read",
            )
        )
        table = _run(d, "llmobserve", "report", *tls, "--key", read_a, "--by", "project,model")
        as_json = _run(
            d, "llmobserve", "report", *tls, "--key", read_a, "--by", "project,model",
            "--format", "json",
        )  # fmt: skip
        # 7. the dashboard in a browser, logged in with the read key; a client
        #    offering ALPN, as browsers and curl do, is served HTTP/1.1 over TLS
        alpn = ssl.create_default_context(cafile=str(d / "collector-cert.pem"))
        alpn.set_alpn_protocols(["h2", "http/1.1"])
        with urllib.request.urlopen(url + "/health", timeout=5, context=alpn) as response:
            assert response.status == 200
        if browser_missing() is None:
            _dashboard_step(url, read_a)
        else:
            warnings.warn(f"walkthrough step 7 not tried: {browser_missing()}", stacklevel=1)
    assert "team-a" in table and "team-b" not in table
    rows = json.loads(as_json)["rows"]
    assert [(r["project"], r["calls"]) for r in rows] == [("team-a", 3)]
    assert rows[0]["model"].startswith("gpt-4o-mini")
