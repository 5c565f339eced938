"""C{observe()}: turn the arguments and environment into routing, once or again."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from llmobserve.paths import default_db_path
from llmobserve.providers import check_provider_id
from llmobserve.sdk import _autostart, _context, _install, _spans
from llmobserve.sdk._routing import ROUTER, RoutingConfig

__all__ = ["AUTO", "Observation", "observe", "shutdown"]

log = logging.getLogger("llmobserve")


class _Auto:
    def __repr__(self) -> str:
        return "<auto>"


#: The default of C{proxy_url}: reuse or start the shared local proxy.
AUTO: Final = _Auto()

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class Observation:
    """What C{observe()} set up.

    C{tracking} is false when calls go direct (disabled, C{proxy_url=None},
    or no proxy could be found or started). With auto-start from inside a
    running event loop the proxy is found in the background:
    C{tracking} is then C{None} until it is known (see L{wait}).
    """

    proxy_url: str | None
    tracking: bool | None
    started_proxy: bool = False
    collector_url: str | None = None
    reason: str | None = None
    _ready: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def wait(self, timeout: float | None = None) -> Observation:
        """Block until a background auto-start has finished; the final observation."""
        self._ready.wait(timeout)
        return _last or self


_lock = threading.RLock()
_last: Observation | None = None
_last_args: tuple[Any, ...] | None = None
_said_instrumentors = False
_said_untracked = False


def _say(message: str, *args: object) -> None:
    """One line the user should see: logged at INFO if the application configured
    logging, else written to stderr (Python shows only warnings by default)."""
    if log.hasHandlers():
        log.info(message, *args)
    else:
        sys.stderr.write((message % args) + "\n")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


_pending: Observation | None = None


def _finish(obs: Observation) -> Observation:
    global _last, _pending
    _last = obs
    obs._ready.set()
    if _pending is not None:
        _pending._ready.set()  # a caller may wait() on the placeholder
        _pending = None
    return obs


def _route_through(
    proxy_url: str,
    collector_url: str | None,
    provider_hosts: Mapping[str, str],
    exclude_hosts: Iterable[str],
    api_key: str | None = None,
) -> None:
    config = RoutingConfig.build(
        proxy_url,
        collector_url=collector_url,
        provider_hosts=provider_hosts,
        exclude_hosts=exclude_hosts,
        api_key=api_key,
    )
    shipper = _spans.SpanShipper(config.proxy_url, config.api_key)
    _spans.use(shipper)
    _context.set_span_sink(shipper)
    ROUTER.configure(config)
    _install.install_hooks()


def _go_direct(reason: str) -> None:
    global _said_untracked
    ROUTER.configure(None)
    _context.set_span_sink(None)
    _spans.use(None)
    if not _said_untracked:
        _said_untracked = True
        log.warning("llmobserve: %s; API calls go direct and are NOT tracked", reason)


def _auto_start(
    port: int,
    collector_url: str | None,
    provider_hosts: Mapping[str, str],
    exclude_hosts: tuple[str, ...],
    api_key: str | None,
    timeout: float,
) -> Observation:
    try:
        found = _autostart.ensure_proxy(
            port,
            collector_url=collector_url,
            provider_hosts=provider_hosts,
            api_key=api_key,
            timeout=timeout,
        )
    except OSError as exc:
        found = f"could not start the proxy: {exc}"
    if isinstance(found, str):
        _go_direct(found)
        return _finish(Observation(None, False, collector_url=collector_url, reason=found))
    _route_through(found.url, collector_url, provider_hosts, exclude_hosts, api_key)
    if found.restarted_for:
        how = "restarted to add provider_hosts " + ", ".join(found.restarted_for)
    else:
        how = "started" if found.started else "already running"
    _say(
        "llmobserve: tracking calls through the proxy at %s (%s), events go to %s",
        found.url,
        how,
        _events_go_to(found.health, collector_url),
    )
    if found.started and collector_url:
        log.warning(
            "llmobserve: no proxy was running on 127.0.0.1:%d, so this process started one "
            "(shipping to %s); if you started a proxy yourself, it is not on that port",
            port,
            collector_url,
        )
    reported = found.health.get("collector")
    if collector_url and isinstance(reported, Mapping):
        seen = reported.get("url")
        if seen and seen != collector_url and not found.started:
            log.warning(
                "llmobserve: the running proxy ships events to %s, not %s: this process's "
                "calls are recorded there. To ship them to %s, stop that proxy (one an "
                "earlier observe() started stops by itself once no process has used it "
                "for LLMOBSERVE_PROXY_LINGER, %g s by default) or start it with --collector %s",
                seen,
                collector_url,
                collector_url,
                _autostart.DEFAULT_LINGER,
                collector_url,
            )
    return _finish(Observation(found.url, True, found.started, collector_url))


def _events_go_to(health: Mapping[str, Any], collector_url: str | None) -> str:
    """Where the proxy says its events go (its C{/health}), in words."""
    reported = health.get("collector")
    if isinstance(reported, Mapping):
        mode, url = reported.get("mode"), reported.get("url")
        if mode == "link":
            return f"the collector at {url}" if url else "a collector"
        if mode == "none":
            return "nowhere (the proxy runs with --no-events)"
        if mode == "embedded":
            return f"its embedded store ({_report_command(url)})"
    if collector_url:
        return f"the collector at {collector_url}"
    return f"its embedded store ({_report_command(None)})"


def _report_command(store: object) -> str:
    """The command that reads this store, as the user can type it: the
    C{llmobserve} beside this Python when none is on C{PATH} (a checkout's
    C{.venv/bin}), with C{--db} when the store is not the default one."""
    command = "llmobserve"
    if shutil.which(command) is None:
        beside = Path(sys.executable).parent / command
        if beside.exists():
            command = str(beside)
    if isinstance(store, str) and store and Path(store) != default_db_path():
        return f"{command} report --db {store}"
    return f"{command} report"


def _check_provider_ids(provider_hosts: Mapping[str, str]) -> None:
    for host, provider in provider_hosts.items():
        check_provider_id(provider, f"provider_hosts[{host!r}]")


def observe(
    collector_url: str | None = None,
    proxy_url: str | _Auto | None = AUTO,
    api_key: str | None = None,
    customer_id: str | None = None,
    tenant_id: str | None = None,
    use_instrumentors: bool = False,
    *,
    provider_hosts: Mapping[str, str] | None = None,
    exclude_hosts: Iterable[str] = (),
    proxy_port: int | None = None,
    start_timeout: float = 10.0,
) -> Observation:
    """Track every outgoing HTTP(S) call of this process through the llmobserve proxy.

    Arguments left out are read from C{LLMOBSERVE_COLLECTOR_URL},
    C{LLMOBSERVE_PROXY_URL}, C{LLMOBSERVE_CUSTOMER_ID}, C{LLMOBSERVE_TENANT_ID}
    and C{LLMOBSERVE_PROXY_PORT}; C{LLMOBSERVE_DISABLED=1} turns it all off.
    Without C{proxy_url}, a proxy on C{127.0.0.1:9000} that answers as ours
    is reused, or one is started and shared. C{proxy_url="http://host:port"}
    uses that proxy; C{proxy_url=None} routes nothing (a warning says calls
    are not tracked). Calling it again with the same arguments does nothing;
    with other arguments it reconfigures. A provider id in C{provider_hosts}
    that the registry does not know raises
    L{llmobserve.providers.UnknownProviderError} (a
    C{ValueError} naming the closest valid id).
    """
    global _last, _last_args, _pending, _said_instrumentors
    if (_env("LLMOBSERVE_DISABLED") or "").lower() in _TRUE:
        with _lock:
            shutdown()
            log.info("llmobserve: disabled by LLMOBSERVE_DISABLED; nothing is tracked")
            return _finish(Observation(None, False, reason="disabled"))
    collector_url = collector_url or _env("LLMOBSERVE_COLLECTOR_URL")
    if isinstance(proxy_url, _Auto) and _env("LLMOBSERVE_PROXY_URL"):
        proxy_url = _env("LLMOBSERVE_PROXY_URL")
    customer_id = customer_id or _env("LLMOBSERVE_CUSTOMER_ID")
    tenant_id = tenant_id or _env("LLMOBSERVE_TENANT_ID")
    api_key = api_key or _env("LLMOBSERVE_API_KEY")
    port = proxy_port or int(_env("LLMOBSERVE_PROXY_PORT") or _autostart.DEFAULT_PORT)
    hosts = dict(provider_hosts or {})
    _check_provider_ids(hosts)
    excluded = tuple(exclude_hosts)

    if use_instrumentors and not _said_instrumentors:
        _said_instrumentors = True
        _say(
            "llmobserve: use_instrumentors is accepted for compatibility and changes nothing: "
            "every provider is covered through the proxy"
        )
    with _lock:
        _context.set_defaults(customer_id, tenant_id)
        args = (collector_url, proxy_url, api_key, sorted(hosts.items()), excluded, port)
        if args == _last_args and _last is not None and _last.reason in (None, "proxy_url=None"):
            return _last  # the same again; a failed auto-start is retried
        _last_args = args
        if proxy_url is None:
            _go_direct("observe(proxy_url=None)")
            return _finish(
                Observation(None, False, collector_url=collector_url, reason="proxy_url=None")
            )
        if isinstance(proxy_url, str):
            _route_through(proxy_url, collector_url, hosts, excluded, api_key)
            _say("llmobserve: tracking calls through the proxy at %s", proxy_url)
            return _finish(Observation(proxy_url.rstrip("/"), True, collector_url=collector_url))
        if _in_event_loop():
            # Never block a running loop: find or start the proxy in a thread;
            # calls made meanwhile go direct.
            pending = Observation(None, None, collector_url=collector_url)
            _last = _pending = pending
            _say(
                "llmobserve: finding or starting the proxy in the background; "
                "calls made until then go direct (not tracked)"
            )
            threading.Thread(
                target=_auto_start,
                args=(port, collector_url, hosts, excluded, api_key, start_timeout),
                name="llmobserve-autostart",
                daemon=True,
            ).start()
            return pending
        return _auto_start(port, collector_url, hosts, excluded, api_key, start_timeout)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def shutdown() -> None:
    """Stop tracking: unhook the libraries, flush sections, give up the proxy lease."""
    global _last, _last_args, _said_untracked
    with _lock:
        _said_untracked = False
        ROUTER.configure(None)
        _install.uninstall_hooks()
        _context.set_span_sink(None)
        _spans.use(None)
        _autostart.release()
        _last = None
        _last_args = None
