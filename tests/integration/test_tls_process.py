"""Real-process tests of upstream TLS verification (RELIABILITY T19, bad-input §2.10).

A trustme CA is given to the proxy with C{--ca-file} (added trust, never
reduced checks); a threaded C{ssl} server on 127.0.0.1 plays the upstream
with each certificate case.  The target is always C{https://localhost:PORT}
(admitted with C{--allow-host localhost}), so only the certificate differs.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from support.clients import RawResponse, proxy_request, raw_request
from support.hostile import TLSUpstream, self_signed_pem, store_events
from support.proxy import ProxyProcess

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("tls-proxy")
    ca_file = workdir / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proc = ProxyProcess(
        [
            "--ca-file",
            str(ca_file),
            "--allow-host",
            "localhost",
            "--allow-cidr",
            "127.0.0.1/32",
            "--connect-timeout",
            "2",
            "--header-timeout",
            "5",
        ],
        workdir=workdir,
    ).start()
    try:
        yield proc
    finally:
        proc.terminate(5.0)


def _leaf(
    ca: trustme.CA,
    *names: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    cert = ca.issue_cert(*names, not_before=not_before, not_after=not_after)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return chain, cert.private_key_pem.bytes()


def _case(name: str, ca: trustme.CA) -> tuple[bytes, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    if name == "good":
        return _leaf(ca, "localhost")
    if name == "wrong-name":
        return _leaf(ca, "wrong.example")
    if name == "self-signed":
        return self_signed_pem("localhost")
    if name == "expired":
        return _leaf(
            ca,
            "localhost",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    if name == "not-yet-valid":
        return _leaf(
            ca,
            "localhost",
            not_before=now + datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=30),
        )
    if name == "other-ca":
        return _leaf(trustme.CA(), "localhost")
    raise AssertionError(name)


def _get(proxy: ProxyProcess, url: str) -> RawResponse:
    data = proxy_request(proxy.port, "POST", url, [("Authorization", "Bearer k")], b"{}")
    return raw_request(proxy.port, data, method="POST", timeout=10)


def test_valid_certificate_forwarded(
    tls_proxy: ProxyProcess, ca: trustme.CA, tmp_path: Path
) -> None:
    """T19 (a): a certificate for localhost from the --ca-file CA: 200, SNI is the name."""
    cert, key = _case("good", ca)
    with TLSUpstream(cert, key, tmp_path) as server:
        resp = _get(tls_proxy, f"https://localhost:{server.port}/v1/chat/completions")
        assert resp.status == 200, (resp.status, resp.body[:300])
        assert resp.json() == {"ok": True}
        record = server.connections[0]
        assert record.handshake_ok
        assert record.sni == "localhost"
        assert record.app_bytes > 0


@pytest.mark.parametrize(
    "case", ["wrong-name", "self-signed", "expired", "not-yet-valid", "other-ca"]
)
def test_bad_certificate_is_502_tls_error(
    tls_proxy: ProxyProcess, ca: trustme.CA, tmp_path: Path, case: str
) -> None:
    """
    T19 (b)-(e): wrong name, self-signed, expired (and not yet valid),
    another CA: 502 with X-LLMObserve-Error: tls_error, and the TLS server
    receives no application data (the handshake is all it sees).
    """
    cert, key = _case(case, ca)
    with TLSUpstream(cert, key, tmp_path) as server:
        resp = _get(tls_proxy, f"https://localhost:{server.port}/v1/chat/completions")
        assert resp.status == 502, (case, resp.status, resp.body[:300])
        assert resp.header("x-llmobserve-error") == b"tls_error", resp.headers
        assert json.loads(resp.body)["error"]["type"] == "tls_error"
        assert server.connections, "the proxy never tried to connect"
        for record in server.connections:
            record.done.wait(3)
            assert record.app_bytes == 0, (case, bytes(record.raw_app[:200]))
            assert not record.raw_app, (case, bytes(record.raw_app[:200]))
    assert tls_proxy.running


def test_ip_literal_target_needs_an_ip_certificate(
    tls_proxy: ProxyProcess, ca: trustme.CA, tmp_path: Path
) -> None:
    """
    §2.10: https://127.0.0.1:PORT served with a certificate for localhost
    only: 502 tls_error (the name checked is the target's, not a guess).
    """
    cert, key = _case("good", ca)
    with TLSUpstream(cert, key, tmp_path) as server:
        resp = _get(tls_proxy, f"https://127.0.0.1:{server.port}/v1/x")
        assert resp.status == 502, (resp.status, resp.body[:300])
        assert resp.header("x-llmobserve-error") == b"tls_error"
        for record in server.connections:
            record.done.wait(3)
            assert record.app_bytes == 0


@pytest.mark.timeout(40)
def test_tls_failures_never_recorded_as_success(
    proxy_factory: Callable[..., ProxyProcess], ca: trustme.CA, tmp_path: Path
) -> None:
    """T19: the events of refused handshakes carry a TLS error, never outcome ok."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy: ProxyProcess = proxy_factory(
        "--ca-file", str(ca_file), "--allow-host", "localhost", "--connect-timeout", "2"
    )
    cases = ["wrong-name", "self-signed", "expired", "other-ca"]
    for case in cases:
        cert, key = _case(case, ca)
        with TLSUpstream(cert, key, tmp_path) as server:
            resp = _get(proxy, f"https://localhost:{server.port}/v1/chat/completions")
            assert resp.status == 502, (case, resp.status)
    time.sleep(0.3)
    assert proxy.terminate(15) is not None
    events = store_events(proxy.home / "events.sqlite3")
    assert len(events) == len(cases), events
    for event in events:
        assert event["outcome"] != "ok", event
        blob = json.dumps(event, default=str)
        assert "tls" in blob.lower(), f"no TLS reason recorded: {blob[:500]}"
