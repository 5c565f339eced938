"""Routing for the standard library's C{urllib.request}.

The hook sits in C{AbstractHTTPHandler.do_open}, where every opener's HTTP
and HTTPS handler (C{urlopen}'s default one, and any C{build_opener()})
opens its connection: the request is complete there (the opener has added
its headers, C{Host}, C{Content-Length}), so a routed call is the same
request sent to the proxy's C{/proxy} with the target header. Redirects are
followed by the opener, above the hook, so each hop is routed on its own;
C{geturl()} and an C{HTTPError}'s C{url} stay the target's. A forward proxy
configured for C{urllib} (C{HTTP(S)_PROXY}) is not used for routed calls:
they go straight to the llmobserve proxy, as the other hooks do.
"""

from __future__ import annotations

import http.client
import io
import socket
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from llmobserve.sdk._body import BodyRecord
from llmobserve.sdk._routing import (
    ROUTER,
    RoutingConfig,
    is_policy_refusal,
    refusal_reason,
    split_authority,
)

__all__ = ["install", "uninstall"]

_MARK = "__llmobserve_original__"

#: Headers of the original request that are not for the proxy: the target's
#: Host (the proxy gets its own), a forward proxy's credentials, and the
#: connection's own (C{do_open} sets C{Connection: close} again).
_NOT_FORWARDED = frozenset({"host", "proxy-authorization", "connection"})


def _rewindable(body: Any) -> tuple[bool, int | None]:
    """Whether C{body} can be sent twice, and its start position if it is a file."""
    if body is None or isinstance(body, (bytes, bytearray, memoryview)):
        return True, None
    tell = getattr(body, "tell", None)
    if tell is not None and getattr(body, "seek", None) is not None:
        try:
            return True, int(tell())
        except (OSError, ValueError, io.UnsupportedOperation):
            return False, None
    return False, None


def _routed_request(m: ModuleType, req: Any, config: RoutingConfig, target: str, data: Any) -> Any:
    """The request to the proxy: the original's method, headers and body, plus ours."""
    routed = m.Request(config.endpoint, data=data, method=req.get_method())
    for name, value in req.header_items():
        if name.lower() not in _NOT_FORWARDED:
            routed.add_unredirected_header(name, value)
    for name, value in ROUTER.proxy_headers(config, target):
        routed.add_unredirected_header(name, value)
    # the opener sets the timeout on every request it opens; a request made
    # some other way gets what the default would have given it
    routed.timeout = getattr(req, "timeout", socket.getdefaulttimeout())
    return routed


def _refused_by_connection(exc: BaseException) -> bool:
    """A C{URLError} for a connection the proxy refused: nothing was sent."""
    return isinstance(getattr(exc, "reason", None), ConnectionRefusedError)


def _with_context(req: Any, extra: list[tuple[str, str]], send: Callable[[], Any]) -> Any:
    """C{send()} a call straight to the proxy (base-URL mode) with the
    context headers added; headers the application set itself are kept.
    They are taken off the application's request again afterwards: a
    request object sent again in another context gets that context's."""
    added = []
    for name, value in extra:
        if not req.has_header(name.capitalize()):
            req.add_unredirected_header(name, value)
            added.append(name.capitalize())
    try:
        return send()
    finally:
        for name in added:
            req.unredirected_hdrs.pop(name, None)


def _patch(m: ModuleType) -> None:
    cls = m.AbstractHTTPHandler
    original: Callable[..., Any] = cls.do_open

    def do_open(self: Any, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        def direct() -> Any:
            return original(self, http_class, req, **http_conn_args)

        if ROUTER.config is None:
            return direct()
        target = req.full_url.partition("#")[0]
        scheme, host, port = split_authority(target)
        config = ROUTER.route(scheme, host, port)
        if config is None or req.has_header("Upgrade"):
            if config is not None:
                ROUTER.upgrade_not_routed(scheme, host, port)
            extra = ROUTER.to_proxy_headers(host, port)
            return _with_context(req, extra, direct) if extra else direct()
        key = ROUTER.key(scheme, host, port)
        body = req.data
        replayable, position = _rewindable(body)
        sent_body = body
        record = None
        if not replayable and not ROUTER.is_confirmed(key) and isinstance(body, Iterable):
            record = BodyRecord()
            sent_body = record.sync(body)
        routed = _routed_request(m, req, config, target, sent_body)
        try:
            response = original(self, http.client.HTTPConnection, routed)
        except m.URLError as exc:
            if not _refused_by_connection(exc):
                raise
            ROUTER.unreachable(exc.reason)
            return direct()
        error = response.headers.get("X-LLMObserve-Error")
        if is_policy_refusal(response.status, error):
            reason = refusal_reason(error, response.read(65536))  # a small JSON body
            response.close()
            ROUTER.refused(key, reason)
            if record is not None:
                req.data = record.replay()  # still chunked: no Content-Length to drop
            elif position is not None:
                body.seek(position)
            return direct()
        ROUTER.confirmed(key)
        response.url = req.get_full_url()
        return response

    setattr(do_open, _MARK, original)
    cls.do_open = do_open


def install(m: ModuleType) -> bool:
    """Hook C{urllib.request}; C{False} if it already was."""
    if hasattr(m.AbstractHTTPHandler.do_open, _MARK):
        return False
    _patch(m)
    return True


def uninstall(m: ModuleType) -> None:
    """Remove the hook."""
    original = getattr(m.AbstractHTTPHandler.do_open, _MARK, None)
    if original is not None:
        m.AbstractHTTPHandler.do_open = original
