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
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
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


@pytest.mark.timeout(120)
def test_the_share_it_with_your_team_walkthrough(tmp_path: Path) -> None:
    """TLS collector with keys, two proxies with their projects' keys, an
    app reaching a proxy by its service name, a read key's report showing
    only its project."""
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
    assert "team-a" in table and "team-b" not in table
    rows = json.loads(as_json)["rows"]
    assert [(r["project"], r["calls"]) for r in rows] == [("team-a", 3)]
    assert rows[0]["model"].startswith("gpt-4o-mini")
