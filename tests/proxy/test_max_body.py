"""The request-body limit's default admits a 2 GiB streamed upload (issue 15 item 5).

Request bodies stream upstream as they arrive, so the limit is a policy
cap, not a memory guard: OpenAI's Files API takes 512 MB files, Gemini's
File API 2 GB. C{--max-body} still sets a lower cap (tests/integration/test_limits.py).
"""

from __future__ import annotations

import pytest
from support.inmemory import InMemoryProxy
from twisted.python import usage

from llmobserve.proxy._config import DEFAULT_MAX_BODY, RelayConfig
from llmobserve.proxy._tap import Options

GiB = 1024 * 1024 * 1024
TARGET = b"X-LLMObserve-Target-URL: http://127.0.0.1:8080/v1/files\r\n"


def _upload_head(length: int) -> bytes:
    return (
        b"POST /proxy HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
        + TARGET
        + b"Content-Length: %d\r\n\r\n" % length
    )


def test_the_default_limit_is_2_gib_in_options_and_config() -> None:
    """twistd llmobserve's --max-body and RelayConfig share one 2 GiB default."""
    options = Options()
    options.parseOptions([])
    assert options["max-body"] == DEFAULT_MAX_BODY == RelayConfig().max_body == 2 * GiB


def test_max_body_still_sets_a_lower_cap() -> None:
    options = Options()
    options.parseOptions(["--max-body", str(32 * 1024 * 1024)])
    assert options["max-body"] == 32 * 1024 * 1024
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--max-body", "lots"])


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
def test_a_2_gib_upload_is_admitted_and_streams(server: str) -> None:
    """Content-Length: 2 GiB with the default config: no 413; the upstream is
    connected and gets the head and the first body bytes before the rest exists."""
    proxy = InMemoryProxy(server=server)
    channel, client = proxy.client()
    channel.dataReceived(_upload_head(2 * GiB) + b"x" * 4096)
    proxy.reactor.advance(0)
    assert client.value() == b"", client.value()[:200]
    upstream = proxy.accept_upstream()
    channel.dataReceived(b"y" * 4096)
    proxy.reactor.advance(0)
    sent = upstream.received()
    assert b"content-length: 2147483648" in sent.lower()
    assert sent.endswith(b"x" * 4096 + b"y" * 4096)
    assert client.value() == b""


@pytest.mark.parametrize("server", ["lean", "twisted-web"])
def test_one_byte_over_2_gib_is_a_413_before_any_connect(server: str) -> None:
    proxy = InMemoryProxy(server=server)
    channel, client = proxy.client()
    channel.dataReceived(_upload_head(2 * GiB + 1))
    proxy.reactor.advance(0)
    assert client.value().startswith(b"HTTP/1.1 413 "), client.value()[:200]
    assert proxy.connects() == 0
