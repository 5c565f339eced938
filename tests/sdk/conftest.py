"""Fixtures for the SDK tests: a fake proxy, a fake target, one caller per HTTP library.

The fake proxy and the target are L{support.upstreams.RecordingUpstream}s on
127.0.0.1: the proxy records what the hooks sent it and answers what the
test queued; the target records what reached it directly. The target is
loopback, so it is routed only because the tests name it in
C{provider_hosts}, as the brief prescribes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.upstreams import RecordingUpstream

import llmobserve
from llmobserve.sdk import _context


@dataclass
class Reply:
    """What the application saw."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    url: str


Caller = Callable[..., Reply]


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


@pytest.fixture(autouse=True)
def _clean_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every SDK test starts and ends unhooked, with no LLMOBSERVE_* in the environment."""
    import os

    for name in list(os.environ):
        if name.startswith("LLMOBSERVE_"):
            monkeypatch.delenv(name)
    llmobserve.shutdown()
    _context.set_defaults(None, None)
    yield
    llmobserve.shutdown()
    _context.set_defaults(None, None)
    logging.getLogger("llmobserve").setLevel(logging.NOTSET)


@pytest.fixture
def fake_proxy() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


@pytest.fixture
def target() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


@pytest.fixture
def routed(fake_proxy: RecordingUpstream, target: RecordingUpstream) -> llmobserve.Observation:
    """observe() pointed at the fake proxy, with the target named as an OpenAI host.

    Section spans are not shipped here (they would be extra requests to the fake
    proxy); test_spans covers them.
    """
    obs = llmobserve.observe(proxy_url=fake_proxy.url, provider_hosts={target.authority: "openai"})
    _context.set_span_sink(None)
    return obs


# -- one caller per library ------------------------------------------------------------


def _gen(chunks: list[bytes]) -> Iterator[bytes]:
    yield from chunks


async def _agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def call_httpx(
    module: str,
    url: str,
    *,
    method: str = "POST",
    body: bytes | list[bytes] | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    async_: bool = False,
) -> Reply:
    mod: Any = __import__(module)
    content: Any = _gen(body) if isinstance(body, list) else body
    if not async_:
        with mod.Client() as client:
            if stream:
                with client.stream(
                    method, url, content=content, params=params, headers=headers
                ) as r:
                    data = b"".join(r.iter_raw())
                    return Reply(r.status_code, _lower(r.headers), data, str(r.url))
            r = client.request(method, url, content=content, params=params, headers=headers)
            return Reply(r.status_code, _lower(r.headers), r.content, str(r.url))

    async def run() -> Reply:
        acontent: Any = _agen(body) if isinstance(body, list) else body
        async with mod.AsyncClient() as client:
            if stream:
                async with client.stream(
                    method, url, content=acontent, params=params, headers=headers
                ) as r:
                    data = b"".join([c async for c in r.aiter_raw()])
                    return Reply(r.status_code, _lower(r.headers), data, str(r.url))
            r = await client.request(method, url, content=acontent, params=params, headers=headers)
            return Reply(r.status_code, _lower(r.headers), r.content, str(r.url))

    return asyncio.run(run())


def call_requests(
    url: str,
    *,
    method: str = "POST",
    body: Any = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    **_: Any,
) -> Reply:
    import requests

    data = _gen(body) if isinstance(body, list) else body
    with requests.Session() as s:
        r = s.request(method, url, data=data, params=params, headers=headers, stream=stream)
        content = b"".join(r.raw.stream(1024, decode_content=False)) if stream else r.content
        return Reply(r.status_code, _lower(r.headers), content, r.url)


def call_urllib3(
    url: str,
    *,
    method: str = "POST",
    body: Any = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    **_: Any,
) -> Reply:
    import urllib3

    if params:
        from urllib.parse import urlencode

        url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
    data = _gen(body) if isinstance(body, list) else body
    with urllib3.PoolManager() as pm:
        r = pm.request(
            method,
            url,
            body=data,
            headers=headers,
            preload_content=not stream,
            chunked=isinstance(body, list),
        )
        content = b"".join(r.stream(1024, decode_content=False)) if stream else r.data
        return Reply(r.status, _lower(r.headers), content, r.url or url)


def call_aiohttp(
    url: str,
    *,
    method: str = "POST",
    body: Any = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    **_: Any,
) -> Reply:
    import aiohttp

    async def run() -> Reply:
        data = _agen(body) if isinstance(body, list) else body
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.request(method, url, data=data, params=params, headers=headers) as r:
                if stream:
                    content = b"".join([c async for c in r.content.iter_any()])
                else:
                    content = await r.read()
                return Reply(r.status, _lower(r.headers), content, str(r.url))

    return asyncio.run(run())


def call_urllib(
    url: str,
    *,
    method: str = "POST",
    body: Any = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    **_: Any,
) -> Reply:
    """The standard library's C{urllib.request}, through an opener of its
    own (no forward proxy from the environment); an error status is a reply."""
    import urllib.error
    import urllib.request

    if params:
        from urllib.parse import urlencode

        url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
    data = _gen(body) if isinstance(body, list) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=20) as r:
            content = b"".join(iter(lambda: r.read(1024), b"")) if stream else r.read()
            return Reply(r.status, _lower(r.headers), content, r.geturl())
    except urllib.error.HTTPError as e:
        with e:
            return Reply(e.code, _lower(e.headers), e.read(), e.url)


def _httpx(module: str, async_: bool) -> Caller:
    def call(url: str, **kw: Any) -> Reply:
        return call_httpx(module, url, async_=async_, **kw)

    return call


CALLERS: dict[str, Caller] = {
    "httpx": _httpx("httpx", False),
    "httpx-async": _httpx("httpx", True),
    "httpx2": _httpx("httpx2", False),
    "httpx2-async": _httpx("httpx2", True),
    "requests": call_requests,
    "urllib3": call_urllib3,
    "urllib": call_urllib,
    "aiohttp": call_aiohttp,
}


@pytest.fixture(params=sorted(CALLERS))
def caller(request: pytest.FixtureRequest) -> Caller:
    """Each HTTP library in turn (sync and async flavours)."""
    return CALLERS[request.param]
