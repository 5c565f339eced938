"""Routing for C{aiohttp} (3.12 or later: client middlewares).

C{ClientSession._request} gets one more middleware, placed last so that the
application's own middlewares see the original request. It points the
request's connection at the proxy (C{req.url}) while C{req.original_url}
keeps the target, which is what aiohttp uses for the response's C{url},
cookies and redirects. Nothing here blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from llmobserve.sdk._body import BodyRecord
from llmobserve.sdk._routing import ROUTER, is_policy_refusal, refusal_reason

__all__ = ["install", "uninstall"]

_MARK = "__llmobserve_original__"


def _maybe_record(req: Any) -> BodyRecord | None:
    """Keep a copy of a one-shot async-iterable body (see L{BodyRecord})."""
    body = getattr(req, "_body", None)
    if body is None or type(body).__name__ != "AsyncIterablePayload":
        return None
    inner = getattr(body, "_iter", None)
    if inner is None or getattr(body, "_cached_chunks", None) is not None:
        return None
    record = BodyRecord()
    body._iter = record.async_(inner).__aiter__()
    return record


def _make_middleware(m: ModuleType) -> Callable[[Any, Any], Awaitable[Any]]:
    url_class = m.client.URL
    connector_error = m.ClientConnectorError
    tcp_connector = m.TCPConnector

    async def llmobserve_route(req: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        url = req.url
        config = ROUTER.route(url.scheme, url.raw_host or "", url.port)
        if config is not None and "Upgrade" in req.headers:
            ROUTER.upgrade_not_routed(url.scheme, url.raw_host or "", url.port)
        if (
            config is None
            or "Upgrade" in req.headers
            or not isinstance(req.session.connector, tcp_connector)
        ):
            extra = ROUTER.to_proxy_headers(url.raw_host or "", url.port)
            if extra:
                # A call straight to the proxy (base-URL mode) carries the context too.
                req.headers = req.headers.copy()
                for name, value in extra:
                    req.headers.setdefault(name, value)
            return await handler(req)
        key = ROUTER.key(url.scheme, url.raw_host or "", url.port)
        saved = (req.url, req.proxy, req.proxy_auth, req.proxy_headers, req.headers.copy())
        record = None if ROUTER.is_confirmed(key) else _maybe_record(req)

        def restore() -> None:
            req.url, req.proxy, req.proxy_auth, req.proxy_headers, req.headers = saved

        # Exactly what aiohttp would have put on the wire (userinfo became a header).
        target = f"{url.scheme}://{url.host_port_subcomponent}{url.raw_path_qs}"
        req.url = url_class(config.endpoint)
        req.proxy = req.proxy_auth = req.proxy_headers = None
        req.headers = req.headers.copy()
        for name, value in ROUTER.proxy_headers(config, target):
            req.headers[name] = value
        try:
            response = await handler(req)
        except connector_error as exc:
            restore()
            ROUTER.unreachable(exc)
            return await handler(req)
        error = response.headers.get("X-LLMObserve-Error")
        if is_policy_refusal(response.status, error):
            try:
                reason = refusal_reason(error, await response.content.read(4096))
            except Exception:  # the reason is a courtesy; the call goes direct regardless
                reason = error or "refused"
            response.close()
            await req.close()
            ROUTER.refused(key, reason)
            restore()
            body = getattr(req, "_body", None)
            if record is not None and body is not None:
                body._cached_chunks = record.replay()
                body._consumed = False
            return await handler(req)
        ROUTER.confirmed(key)
        return response

    return llmobserve_route


def install(m: ModuleType) -> bool:
    """Hook C{aiohttp}; C{False} if it already was or is older than 3.12."""
    cls = m.ClientSession
    if hasattr(cls._request, _MARK) or not hasattr(m, "ClientMiddlewareType"):
        return False
    original = cls._request
    middleware = _make_middleware(m)

    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        if ROUTER.config is not None:
            given = kwargs.get("middlewares")
            chain = self._middlewares if given is None else given
            kwargs["middlewares"] = (*chain, middleware)
        return await original(self, method, str_or_url, **kwargs)

    setattr(_request, _MARK, original)
    cls._request = _request
    return True


def uninstall(m: ModuleType) -> None:
    """Remove the hook."""
    original = getattr(m.ClientSession._request, _MARK, None)
    if original is not None:
        m.ClientSession._request = original
