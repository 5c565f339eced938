"""Routing for C{httpx} 0.2x and C{httpx2} (the same design, two packages).

The hook sits in the default transports (C{HTTPTransport.handle_request},
C{AsyncHTTPTransport.handle_async_request}), below the client: redirects,
cookies, auth and C{response.request} keep working on the original URL,
and a routed call reuses the client's own connection pool to reach the
proxy. Mock and custom transports are left alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

from llmobserve.sdk._body import BodyRecord
from llmobserve.sdk._routing import ROUTER, RoutingConfig, is_policy_refusal, refusal_reason

__all__ = ["install", "uninstall"]

_MARK = "__llmobserve_original__"
_PLAIN_POOLS = ("ConnectionPool", "AsyncConnectionPool")


def _target_url(url: Any) -> str:
    """The absolute target URL exactly as the library would have sent it."""
    raw_path: bytes = url.raw_path
    return f"{url.scheme}://{url.netloc.decode('ascii')}{raw_path.decode('ascii')}"


def _wants_upgrade(request: Any) -> bool:
    return "upgrade" in request.headers


def _add_context(request: Any) -> None:
    """A call straight to the proxy (base-URL mode) carries the context headers too;
    headers the application set itself are kept."""
    url = request.url
    extra = ROUTER.to_proxy_headers(url.host, url.port)
    headers = request.headers
    for name, value in extra:
        if name not in headers:
            headers[name] = value


#: Parsed C{/proxy} URLs by (library, endpoint): parsing one costs ~10 us, a lookup 0.1.
_endpoints: dict[tuple[str, str], Any] = {}


def _endpoint_url(m: ModuleType, config: RoutingConfig) -> Any:
    key = (m.__name__, config.endpoint)
    url = _endpoints.get(key)
    if url is None:
        url = _endpoints[key] = m.URL(config.endpoint)
    return url


def _routed_request(m: ModuleType, request: Any, config: RoutingConfig, stream: Any) -> Any:
    headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
    headers.extend(
        (k.encode("ascii"), v.encode("ascii"))
        for k, v in ROUTER.proxy_headers(config, _target_url(request.url))
    )
    return m.Request(
        request.method,
        _endpoint_url(m, config),
        headers=headers,
        stream=stream,
        extensions=request.extensions,
    )


def _plain_transport(m: ModuleType, transport: Any, async_: bool) -> Any:
    """The transport to reach the proxy with: C{transport} itself unless it goes via a proxy.

    A transport mounted for C{HTTPS_PROXY}/C{ALL_PROXY} would send our
    loopback call to the corporate proxy; a sibling plain transport, kept on
    the instance, goes straight to ours.
    """
    pool = getattr(transport, "_pool", None)
    if pool is None or type(pool).__name__ in _PLAIN_POOLS:
        return transport
    sibling = transport.__dict__.get("_llmobserve_plain")
    if sibling is None:
        sibling = m.AsyncHTTPTransport() if async_ else m.HTTPTransport()
        transport.__dict__["_llmobserve_plain"] = sibling
    return sibling


def _make_streams(m: ModuleType) -> tuple[type, type]:
    class RecordedSync(m.SyncByteStream):  # type: ignore[name-defined,misc]  # m: httpx, a ModuleType
        def __init__(self, inner: Any, record: BodyRecord) -> None:
            self._inner = inner
            self._record = record

        def __iter__(self) -> Iterator[bytes]:
            return self._record.sync(self._inner)

        def close(self) -> None:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()

    class RecordedAsync(m.AsyncByteStream):  # type: ignore[name-defined,misc]  # m: httpx, a ModuleType
        def __init__(self, inner: Any, record: BodyRecord) -> None:
            self._inner = inner
            self._record = record

        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._record.async_(self._inner)

        async def aclose(self) -> None:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()

    return RecordedSync, RecordedAsync


def _patch_sync(m: ModuleType, recorded: type) -> None:
    cls = m.HTTPTransport
    original: Callable[[Any, Any], Any] = cls.handle_request

    def handle_request(self: Any, request: Any) -> Any:
        url = request.url
        config = ROUTER.route(url.scheme, url.host, url.port)
        if config is None or _wants_upgrade(request):
            if config is not None:
                ROUTER.upgrade_not_routed(url.scheme, url.host, url.port)
            _add_context(request)
            return original(self, request)
        key = ROUTER.key(url.scheme, url.host, url.port)
        record = None
        stream = request.stream
        if not isinstance(stream, m.ByteStream) and not ROUTER.is_confirmed(key):
            record = BodyRecord()
            stream = recorded(stream, record)
        routed = _routed_request(m, request, config, stream)
        try:
            response = original(_plain_transport(m, self, False), routed)
        except (m.ConnectError, m.ConnectTimeout) as exc:
            ROUTER.unreachable(exc)
            return original(self, request)
        error = response.headers.get("x-llmobserve-error")
        if is_policy_refusal(response.status_code, error):
            reason = refusal_reason(error, response.read())
            response.close()
            ROUTER.refused(key, reason)
            if record is not None:
                request.stream = m.ByteStream(b"".join(record.replay()))
            return original(self, request)
        ROUTER.confirmed(key)
        return response

    setattr(handle_request, _MARK, original)
    cls.handle_request = handle_request


def _patch_async(m: ModuleType, recorded: type) -> None:
    cls = m.AsyncHTTPTransport
    original: Callable[[Any, Any], Any] = cls.handle_async_request

    async def handle_async_request(self: Any, request: Any) -> Any:
        url = request.url
        config = ROUTER.route(url.scheme, url.host, url.port)
        if config is None or _wants_upgrade(request):
            if config is not None:
                ROUTER.upgrade_not_routed(url.scheme, url.host, url.port)
            _add_context(request)
            return await original(self, request)
        key = ROUTER.key(url.scheme, url.host, url.port)
        record = None
        stream = request.stream
        if not isinstance(stream, m.ByteStream) and not ROUTER.is_confirmed(key):
            record = BodyRecord()
            stream = recorded(stream, record)
        routed = _routed_request(m, request, config, stream)
        try:
            response = await original(_plain_transport(m, self, True), routed)
        except (m.ConnectError, m.ConnectTimeout) as exc:
            ROUTER.unreachable(exc)
            return await original(self, request)
        error = response.headers.get("x-llmobserve-error")
        if is_policy_refusal(response.status_code, error):
            reason = refusal_reason(error, await response.aread())
            await response.aclose()
            ROUTER.refused(key, reason)
            if record is not None:
                request.stream = m.ByteStream(b"".join(record.replay()))
            return await original(self, request)
        ROUTER.confirmed(key)
        return response

    setattr(handle_async_request, _MARK, original)
    cls.handle_async_request = handle_async_request


def install(m: ModuleType) -> bool:
    """Hook C{m} (C{httpx} or C{httpx2}); C{False} if it already was."""
    if hasattr(m.HTTPTransport.handle_request, _MARK):
        return False
    recorded_sync, recorded_async = _make_streams(m)
    _patch_sync(m, recorded_sync)
    _patch_async(m, recorded_async)
    return True


def uninstall(m: ModuleType) -> None:
    """Remove the hooks from C{m}."""
    for cls, name in (
        (m.HTTPTransport, "handle_request"),
        (m.AsyncHTTPTransport, "handle_async_request"),
    ):
        original = getattr(getattr(cls, name), _MARK, None)
        if original is not None:
            setattr(cls, name, original)
