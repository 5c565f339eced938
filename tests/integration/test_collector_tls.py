"""The collector on a TLS port, and the proxy's link to it verifying the certificate.

Real processes: C{twistd llmobserve-collector --port ssl:...} with a
certificate from a test CA (trustme), C{twistd llmobserve --collector
https://...}, chat calls through the proxy to a fake upstream, and the
C{llmobserve} CLI reading the report over HTTPS. Every refusal (a collector
certificate from another CA, plain TCP to the TLS port) keeps the events in
the proxy's spool, and they are delivered once the link is fixed.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.clients import chat_calls, chat_request, raw_request
from support.proxy import LOOPBACK_ARGS, CollectorProcess, ProxyProcess, loopback_env
from support.upstreams import RecordingUpstream

CALLS = 20


def _ca_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The collector's key and chain (for 127.0.0.1), its CA, and another CA."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server_pem = tmp_path / "collector.pem"
    server.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca_pem, other_pem = tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    other.cert_pem.write_to_path(str(other_pem))
    return server_pem, ca_pem, other_pem


def _get_json(url: str, ca_file: Path | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return json.loads(response.read())


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _tls_collector(tmp_path: Path, server_pem: Path) -> CollectorProcess:
    return CollectorProcess(
        port=f"ssl:0:interface=127.0.0.1:privateKey={server_pem}:certKey={server_pem}",
        db=tmp_path / "collector.db",
        workdir=tmp_path / "collector",
    )


def _proxy(tmp_path: Path, upstream: RecordingUpstream, *collector_args: str) -> ProxyProcess:
    return ProxyProcess(
        [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai", *collector_args],
        workdir=tmp_path / "proxy",
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmobserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=loopback_env(),
    )


@pytest.mark.timeout(60)
def test_events_reach_a_tls_collector_and_the_cli_reads_it(tmp_path: Path) -> None:
    """C{--port ssl:...} serves link and HTTP over TLS; C{--collector https://}
    with the private CA delivers every event; the CLI reads the report with
    C{--ca-file}, and refuses the collector without it."""
    server_pem, ca_pem, _ = _ca_files(tmp_path)
    with RecordingUpstream() as upstream, _tls_collector(tmp_path, server_pem) as collector:
        assert collector.url.startswith("https://127.0.0.1:")  # the start-up line says https
        url = f"https://127.0.0.1:{collector.port}"
        with _proxy(
            tmp_path, upstream, "--collector", url, "--collector-ca-file", str(ca_pem)
        ) as proxy:
            chat_calls(proxy.port, upstream.url, CALLS)
            _wait_for(
                lambda: _get_json(url + "/health", ca_pem)["events_stored"] == CALLS,
                20,
                "the events at the collector",
            )
            assert _get_json(proxy.url + "/health")["collector"]["state"] == "connected"
        report = _cli("report", "--collector", url, "--ca-file", str(ca_pem), "--format", "json")
        assert report.returncode == 0, report.stderr
        assert sum(row["calls"] for row in json.loads(report.stdout)["rows"]) == CALLS
        refused = _cli("report", "--collector", url)
        assert refused.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["wrong-ca", "plain-tcp"])
def test_a_refused_link_keeps_every_event_until_it_is_fixed(tmp_path: Path, fault: str) -> None:
    """A collector certificate signed by another CA, or plain TCP to the TLS
    port: calls still answer 200, nothing is stored, the events wait in the
    spool; restarted with the right CA, the proxy delivers each of them once."""
    server_pem, ca_pem, other_pem = _ca_files(tmp_path)
    with RecordingUpstream() as upstream, _tls_collector(tmp_path, server_pem) as collector:
        https = f"https://127.0.0.1:{collector.port}"
        bad = (
            ("--collector", https, "--collector-ca-file", str(other_pem))
            if fault == "wrong-ca"
            else ("--collector", f"http://127.0.0.1:{collector.port}")
        )
        with _proxy(tmp_path, upstream, *bad) as proxy:
            chat_calls(proxy.port, upstream.url, CALLS)
            _wait_for(
                lambda: _get_json(proxy.url + "/health")["events_waiting"] == CALLS,
                10,
                "the events in the spool",
            )
            time.sleep(1.0)  # several link attempts
            health = _get_json(proxy.url + "/health")
            assert health["collector"]["state"] != "connected", health
            assert health["events_waiting"] == CALLS
            if fault == "plain-tcp":  # the collector said why, and /health says it
                assert health["collector"]["refused"] == "tls_required", health
        assert _get_json(https + "/health", ca_pem)["events_stored"] == 0
        with _proxy(
            tmp_path, upstream, "--collector", https, "--collector-ca-file", str(ca_pem)
        ) as proxy:
            _wait_for(
                lambda: _get_json(proxy.url + "/health")["events_waiting"] == 0,
                20,
                "the spool to drain",
            )
        events = _get_json(https + "/api/events?limit=1000", ca_pem)["events"]
    assert len({e["id"] for e in events}) == len(events) == CALLS


@pytest.mark.timeout(60)
def test_plain_http_to_the_tls_port_is_told_to_use_https(tmp_path: Path) -> None:
    """A plain-text request to the TLS port (C{curl http://...}, the CLI
    given C{--collector http://...}) gets a 400 saying the port speaks TLS,
    not an empty reply; HTTPS on the same port still answers, and a client
    that never speaks is closed like any other."""
    server_pem, ca_pem, _ = _ca_files(tmp_path)
    with _tls_collector(tmp_path, server_pem) as collector:
        plain = raw_request(collector.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert plain.status == 400
        assert plain.header("X-LLMObserve-Error") == b"tls_required"
        assert b"use https://" in plain.body
        listed = _cli("budgets", "list", "--collector", f"http://127.0.0.1:{collector.port}")
        assert listed.returncode != 0
        assert "TLS" in listed.stderr, listed.stderr
        health = _get_json(f"https://127.0.0.1:{collector.port}/health", ca_pem)
        assert health["events_stored"] == 0


def test_a_collector_ca_file_needs_an_https_collector(tmp_path: Path) -> None:
    """A misconfiguration is a usage error at start-up, not a silent plain link."""
    _, ca_pem, _ = _ca_files(tmp_path)
    proxy = ProxyProcess(
        ["--collector", "http://127.0.0.1:1", "--collector-ca-file", str(ca_pem)],
        workdir=tmp_path / "proxy",
        start_timeout=10,
    )
    with pytest.raises(Exception, match="needs an https"):
        proxy.start()
    proxy.kill()


def _chat(proxy: ProxyProcess, upstream: RecordingUpstream, model: str, key: str) -> Any:
    """A chat call through the proxy with the client key C{key}."""
    body = json.dumps({"model": model, "max_tokens": 10, "messages": []}).encode()
    request = chat_request(proxy.port, upstream.url, body)
    head, sep, rest = request.partition(b"\r\n")
    return raw_request(
        proxy.port, head + sep + b"X-LLMObserve-Key: " + key.encode() + b"\r\n" + rest
    )


def _new_key(db: Path, name: str, scope: str) -> str:
    done = _cli("keys", "create", "--name", name, "--scope", scope, "--db", str(db))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


@pytest.mark.timeout(120)
def test_budgets_limits_and_key_checks_trust_the_collector_ca_file(tmp_path: Path) -> None:
    """With C{--collector https://...} and C{--collector-ca-file}, the proxy
    reads the collector's budgets and rate limits and takes its grants over
    TLS (a budget refuses gpt-4o with a 402, a limit of one call a minute
    refuses the second gpt-4o-mini call with a 429), and checks its clients'
    keys with C{/api/whoami} over TLS (a valid key passes, another gets
    401); the CLI sets them with C{--ca-file}."""
    server_pem, ca_pem, _ = _ca_files(tmp_path)
    db = tmp_path / "collector.db"
    admin = _new_key(db, "admin", "admin")
    client_key = _new_key(db, "app", "ingest")
    collector = CollectorProcess(
        ["--require-keys"],
        port=f"ssl:0:interface=127.0.0.1:privateKey={server_pem}:certKey={server_pem}",
        db=db,
        workdir=tmp_path / "collector",
    )
    with RecordingUpstream() as upstream, collector:
        https = f"https://127.0.0.1:{collector.port}"
        tls = ("--key", admin, "--ca-file", str(ca_pem))
        budget = (
            "--name",
            "cap",
            "--limit-usd",
            "0.000001",
            "--window",
            "day",
            "--model",
            "gpt-4o",
        )
        done = _cli("budgets", *tls, "set", *budget, "--collector", https)
        assert done.returncode == 0, done.stderr
        limit = ("--name", "rpm", "--calls-per-minute", "1", "--model", "gpt-4o-mini")
        done = _cli("limits", *tls, "set", *limit, "--collector", https)
        assert done.returncode == 0, done.stderr
        left = 60.0 - time.time() % 60.0
        if left < 20.0:  # both gpt-4o-mini calls in one minute
            time.sleep(left + 0.5)
        with _proxy(
            tmp_path,
            upstream,
            "--require-keys",
            "--collector",
            https,
            "--collector-ca-file",
            str(ca_pem),
            "--collector-key",
            admin,
        ) as proxy:
            refused = _chat(proxy, upstream, "gpt-4o", client_key)
            assert refused.status == 402, refused.body
            first = _chat(proxy, upstream, "gpt-4o-mini", client_key)
            assert first.status == 200, first.body
            second = _chat(proxy, upstream, "gpt-4o-mini", client_key)
            assert second.status == 429, second.body
            assert json.loads(second.body)["error"]["type"] == "rate_limited"
            assert _chat(proxy, upstream, "gpt-4o-mini", "llmo_not-a-key").status == 401
            assert "cannot be read" not in proxy.log_text()
            assert "unreachable" not in proxy.log_text()
        assert len(upstream.requests) == 1
