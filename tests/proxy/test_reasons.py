"""Reason phrases on the lean channel's status lines come from the libraries."""

from __future__ import annotations

from http import HTTPStatus

from support.inmemory import InMemoryProxy
from twisted.web.http import RESPONSES

from llmobserve.proxy._channel import _REASONS


def test_twisted_webs_phrases_win_and_the_stdlib_fills_the_gaps() -> None:
    """Every code twisted.web names has its phrase; the codes it lacks that the
    proxy sends itself (429, 431, 508) have the standard library's."""
    assert {code: _REASONS[code] for code in RESPONSES} == RESPONSES
    for code in (429, 431, 508):
        assert code not in RESPONSES
        assert _REASONS[code] == HTTPStatus(code).phrase.encode()


def test_the_proxys_own_404_has_its_phrase() -> None:
    """An unknown route answers C{HTTP/1.1 404 Not Found}."""
    proxy = InMemoryProxy()
    channel, client = proxy.client()
    channel.dataReceived(b"GET /nope/x HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 404 Not Found\r\n")
