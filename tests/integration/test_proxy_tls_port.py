"""The proxy on a TLS port (C{--port ssl:...}): HTTPS is relayed, plain
text is told to use HTTPS rather than closed without a word.

Real processes: C{twistd llmobserve --port ssl:...} with a certificate
from a test CA (trustme), a fake upstream, and an HTTPS client that
trusts that CA.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import trustme
from support.clients import raw_request
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream


def test_plain_text_to_the_proxy_s_tls_port_is_told_to_use_https(tmp_path: Path) -> None:
    """A plain-HTTP request (an SDK given C{proxy_url="http://..."} for a
    TLS proxy) gets a 400 with C{X-LLMObserve-Error: tls_required} and the
    error contract's JSON, not an empty reply; a chat call over HTTPS on
    the same port is relayed, and the proxy says it listens on https://."""
    ca = trustme.CA()
    pem = tmp_path / "proxy.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    with (
        RecordingUpstream() as upstream,
        ProxyProcess(
            [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai"],
            port=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}",
            workdir=tmp_path / "proxy",
        ) as proxy,
    ):
        assert proxy.url.startswith("https://127.0.0.1:")
        plain = raw_request(proxy.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert plain.status == 400
        assert plain.header("X-LLMObserve-Error") == b"tls_required"
        error = json.loads(plain.body)["error"]
        assert error["type"] == "tls_required" and "use https://" in error["message"]
        context = ssl.create_default_context(cafile=str(ca_pem))
        request = urllib.request.Request(
            proxy.url + "/proxy",
            data=b'{"model":"gpt-4o-mini","messages":[]}',
            headers={
                "Content-Type": "application/json",
                "X-LLMObserve-Target-URL": f"http://127.0.0.1:{upstream.port}/v1/chat/completions",
            },
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 200
        [relayed] = upstream.requests
        assert relayed.path == "/v1/chat/completions"
