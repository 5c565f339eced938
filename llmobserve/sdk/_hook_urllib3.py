"""Routing for C{urllib3} 2, and so for C{requests} and everything built on it.

The hook sits in C{HTTPConnectionPool.urlopen}, the one place every urllib3
request passes (C{PoolManager}, C{requests}' adapter, botocore): the
connection pool names the target, and a routed call is sent on a pool of
connections to the proxy instead. C{requests} builds its C{Response} from its
own request object, so C{response.url}, cookies and redirects stay those of
the original URL.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from llmobserve.sdk._body import BodyRecord
from llmobserve.sdk._routing import ROUTER, RoutingConfig, is_policy_refusal, refusal_reason

__all__ = ["install", "uninstall"]

_MARK = "__llmobserve_original__"
_pools: dict[str, Any] = {}
_pools_lock = threading.Lock()


def _proxy_pool(m: ModuleType, config: RoutingConfig) -> Any:
    pool = _pools.get(config.endpoint)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(config.endpoint)
            if pool is None:
                host, _, port = config.authority.rpartition(":")
                pool = m.HTTPConnectionPool(host.strip("[]"), int(port), maxsize=32, block=False)
                _pools[config.endpoint] = pool
    return pool


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _target(pool: Any, url: str) -> tuple[str, str, int, str] | None:
    """C{(scheme, host, port, absolute_url)} of a urlopen call on C{pool}.

    C{None} for an absolute URL naming another host than a proxy-less pool
    (urllib3 itself refuses or mishandles those; leave them to it).
    """
    if url.startswith(("http://", "https://")):
        # A pool behind a forward proxy (ProxyManager) gets absolute URLs.
        if pool.proxy is None and not pool.is_same_host(url):
            return None
        parsed = _parse_url(url)
        scheme = parsed.scheme
        return scheme, parsed.host or "", parsed.port or _default_port(scheme), url
    scheme = pool.scheme
    host = pool.host
    port = pool.port or _default_port(scheme)
    shown = host if ":" not in host or host.startswith("[") else f"[{host}]"
    netloc = shown if port == _default_port(scheme) else f"{shown}:{port}"
    return scheme, host, port, f"{scheme}://{netloc}{url or '/'}"


_parse_url: Callable[[str], Any]


def _headers_for_proxy(
    pool: Any, headers: Any, config: RoutingConfig, target: str
) -> dict[str, str]:
    base = pool.headers if headers is None else headers
    out = {k: v for k, v in base.items() if k.lower() != "host"}
    for name, value in ROUTER.proxy_headers(config, target):
        out[name] = value
    return out


def _with_context(pool: Any, headers: Any, extra: list[tuple[str, str]]) -> dict[str, str]:
    """The headers of a call straight to the proxy (base-URL mode), context added;
    headers the application set itself are kept."""
    base = pool.headers if headers is None else headers
    out = dict(base.items())
    present = {k.lower() for k in out}
    for name, value in extra:
        if name.lower() not in present:
            out[name] = value
    return out


def _rewindable(body: Any) -> tuple[bool, int | None]:
    """Whether C{body} can be sent twice, and its start position if it is a file."""
    if body is None or isinstance(body, (bytes, bytearray, memoryview, str)):
        return True, None
    tell = getattr(body, "tell", None)
    if tell is not None and getattr(body, "seek", None) is not None:
        try:
            return True, int(tell())
        except (OSError, ValueError, io.UnsupportedOperation):
            return False, None
    return False, None


def _patch(m: ModuleType) -> None:
    cls = m.HTTPConnectionPool
    original: Callable[..., Any] = cls.urlopen

    def urlopen(
        self: Any,
        method: str,
        url: str,
        body: Any = None,
        headers: Any = None,
        retries: Any = None,
        redirect: bool = True,
        assert_same_host: bool = True,
        **kw: Any,
    ) -> Any:
        def direct() -> Any:
            return original(
                self, method, url, body, headers, retries, redirect, assert_same_host, **kw
            )

        config = ROUTER.config
        if config is None or (_pools.get(config.endpoint) is self):
            return direct()
        where = _target(self, url)
        if where is None:
            return direct()
        scheme, host, port, target = where
        config = ROUTER.route(scheme, host, port)
        upgrade = headers is not None and any(k.lower() == "upgrade" for k in headers)
        if config is None or upgrade:
            if config is not None:
                ROUTER.upgrade_not_routed(scheme, host, port)
            extra = ROUTER.to_proxy_headers(host, port)
            if extra:
                headers = _with_context(self, headers, extra)
            return direct()
        key = ROUTER.key(scheme, host, port)
        replayable, position = _rewindable(body)
        sent_body = body
        record = None
        if not replayable and not ROUTER.is_confirmed(key) and isinstance(body, Iterable):
            record = BodyRecord()
            sent_body = record.sync(body)
        routed_headers = _headers_for_proxy(self, headers, config, target)
        if retries is None:
            retries = self.retries  # the target pool's default, not the proxy pool's
        try:
            response = original(
                _proxy_pool(m, config),
                method,
                "/proxy",
                sent_body,
                routed_headers,
                retries,
                False,
                False,
                **kw,
            )
        except (m.exceptions.NewConnectionError, m.exceptions.ConnectTimeoutError) as exc:
            ROUTER.unreachable(exc)
            return direct()
        except m.exceptions.MaxRetryError as exc:
            if not isinstance(exc.reason, m.exceptions.ConnectTimeoutError):
                raise
            ROUTER.unreachable(exc.reason)
            return direct()
        error = response.headers.get("X-LLMObserve-Error")
        if is_policy_refusal(response.status, error):
            reason = refusal_reason(error, response.data or b"")  # a small JSON body
            response.drain_conn()
            response.release_conn()
            ROUTER.refused(key, reason)
            if record is not None:
                body = b"".join(record.replay())
            elif position is not None:
                body.seek(position)
            return direct()
        ROUTER.confirmed(key)
        response.url = target
        if redirect and response.get_redirect_location():
            return _follow_redirect(
                self, response, method, url, body, headers, retries, assert_same_host, kw
            )
        return response

    setattr(urlopen, _MARK, original)
    cls.urlopen = urlopen


def _follow_redirect(
    pool: Any,
    response: Any,
    method: str,
    url: str,
    body: Any,
    headers: Any,
    retries: Any,
    assert_same_host: bool,
    kw: dict[str, Any],
) -> Any:
    """What C{urlopen(redirect=True)} does on a pool: follow through the (hooked) pool.

    C{PoolManager} and C{requests} pass C{redirect=False} and follow
    redirects themselves; only direct pool users get here.
    """
    m = _urllib3
    location = response.get_redirect_location()
    if not isinstance(retries, m.util.Retry):
        retries = m.util.Retry.from_int(retries, redirect=True, default=pool.retries)
    if response.status == 303:
        method, body = "GET", None
        headers = m.HTTPHeaderDict(headers or {})._prepare_for_method_change()
        kw = {**kw, "chunked": False, "body_pos": None}
    try:
        retries = retries.increment(method, url, response=response, _pool=pool)
    except m.exceptions.MaxRetryError:
        if retries.raise_on_redirect:
            response.drain_conn()
            raise
        return response
    response.drain_conn()
    return pool.urlopen(
        method,
        location,
        body,
        headers,
        retries=retries,
        redirect=True,
        assert_same_host=assert_same_host,
        **kw,
    )


_urllib3: Any = None


def install(m: ModuleType) -> bool:
    """Hook C{urllib3}; C{False} if it already was."""
    global _urllib3, _parse_url
    if hasattr(m.HTTPConnectionPool.urlopen, _MARK):
        return False
    _urllib3 = m
    _parse_url = m.util.parse_url
    _patch(m)
    return True


def uninstall(m: ModuleType) -> None:
    """Remove the hook and close the pools to the proxy."""
    original = getattr(m.HTTPConnectionPool.urlopen, _MARK, None)
    if original is not None:
        m.HTTPConnectionPool.urlopen = original
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
