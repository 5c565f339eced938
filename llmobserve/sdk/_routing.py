"""Which outgoing calls go through the proxy, and what the SDK has learnt.

L{RoutingConfig} is the immutable answer to C{observe()}'s arguments;
L{Router} is the one mutable object the hooks consult on every call. Its
fast path is one dict lookup per call; everything else (parsing an IP,
matching suffixes) happens once per C{(scheme, host, port)}.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from llmobserve.sdk._context import context_headers

__all__ = ["ROUTER", "Router", "RoutingConfig", "is_policy_refusal", "split_authority"]

log = logging.getLogger("llmobserve")

_DEFAULT_PORTS = {"http": 80, "https": 443}

#: How long the SDK sends calls direct after the proxy could not be reached.
PROXY_RETRY_SECONDS = 5.0

#: Bound on the per-host decision cache (cleared when full).
_MAX_DECISIONS = 4096

HostKey = tuple[str, str, int]


def split_authority(url: str) -> tuple[str, str, int]:
    """C{(scheme, host, port)} of an absolute URL, host lower-cased, port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return scheme, host, port


def _host_port_key(spec: str) -> str:
    """Normalise a C{HOST[:PORT]} key from C{provider_hosts} / C{exclude_hosts}.

    The canonical form is C{host:port} or C{host}, host lower-cased and
    unbracketed, the form L{RoutingConfig} looks keys up with.
    C{[v6]:port}, a bare IPv6 address and a full URL are accepted.
    """
    spec = spec.strip().lower()
    if "://" in spec:
        _, host, port = split_authority(spec)
        return f"{host}:{port}"
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return f"{host}:{rest[1:]}" if rest.startswith(":") and rest[1:] else host
    return spec


def _non_public_ip(host: str) -> bool:
    """True for a literal IP address that is not globally routable."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Where routed calls go, and which targets stay direct.

    C{provider_hosts} maps C{"HOST:PORT"} (or C{"HOST"}, any port) to a
    provider id; those hosts are routed even when local. C{exclude_hosts}
    holds exact hosts, C{HOST:PORT}, or C{*.suffix} / C{.suffix} patterns.
    """

    proxy_url: str
    provider_hosts: Mapping[str, str] = field(default_factory=dict)
    exclude_hosts: tuple[str, ...] = ()
    exempt: frozenset[tuple[str, int]] = frozenset()
    #: sent as X-LLMObserve-Key on every routed call (the proxy consumes it)
    api_key: str | None = field(default=None, repr=False)
    endpoint: str = field(init=False)
    authority: str = field(init=False)

    def __post_init__(self) -> None:
        scheme, host, port = split_authority(self.proxy_url)
        if scheme != "http" or not host:
            raise ValueError(f"proxy_url must be http://HOST:PORT, got {self.proxy_url!r}")
        shown = f"[{host}]" if ":" in host else host
        object.__setattr__(self, "authority", f"{shown}:{port}")
        object.__setattr__(self, "endpoint", f"http://{shown}:{port}/proxy")
        object.__setattr__(self, "exempt", self.exempt | {(host, port)})
        object.__setattr__(
            self, "provider_hosts", {_host_port_key(k): v for k, v in self.provider_hosts.items()}
        )
        object.__setattr__(
            self, "exclude_hosts", tuple(_host_port_key(h) for h in self.exclude_hosts)
        )

    @classmethod
    def build(
        cls,
        proxy_url: str,
        *,
        collector_url: str | None = None,
        provider_hosts: Mapping[str, str] | None = None,
        exclude_hosts: Iterable[str] = (),
        api_key: str | None = None,
    ) -> RoutingConfig:
        """A config that also exempts the collector itself."""
        exempt: set[tuple[str, int]] = set()
        if collector_url:
            _, host, port = split_authority(collector_url)
            exempt.add((host, port))
        return cls(
            proxy_url=proxy_url.rstrip("/"),
            provider_hosts=dict(provider_hosts or {}),
            exclude_hosts=tuple(exclude_hosts),
            exempt=frozenset(exempt),
            api_key=api_key or None,
        )

    def _excluded(self, host: str, port: int) -> bool:
        for pattern in self.exclude_hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif pattern.startswith("."):
                if host.endswith(pattern) or host == pattern[1:]:
                    return True
            elif pattern == host or pattern == f"{host}:{port}":
                return True
        return False

    def provider_for(self, host: str, port: int) -> str | None:
        """The provider named for this host in C{provider_hosts}, if any."""
        named = self.provider_hosts
        return named.get(f"{host}:{port}") or named.get(host)

    def decide(self, scheme: str, host: str, port: int) -> bool:
        """Whether a call to C{scheme://host:port} should go through the proxy.

        Pure: does not consult what the proxy has refused (see L{Router}).
        """
        if scheme not in _DEFAULT_PORTS or not host:
            return False
        if (host, port) in self.exempt:
            return False
        if self.provider_for(host, port) is not None:
            return True
        if self._excluded(host, port):
            return False
        if host == "localhost" or host.endswith(".localhost"):
            return False
        return not _non_public_ip(host)


def is_policy_refusal(status: int, error_header: str | None) -> bool:
    """A proxy refusal that guarantees nothing went upstream (safe to send direct)."""
    return status == 403 and error_header is not None


@dataclass(slots=True)
class _State:
    decisions: dict[HostKey, bool] = field(default_factory=dict)
    refused: set[HostKey] = field(default_factory=set)
    confirmed: set[HostKey] = field(default_factory=set)
    down_until: float = 0.0
    warned_down: bool = False


class Router:
    """The routing state shared by every hook in the process."""

    def __init__(self) -> None:
        self.config: RoutingConfig | None = None
        self._state = _State()
        self._lock = threading.Lock()

    def configure(self, config: RoutingConfig | None) -> None:
        """Switch routing on (a config) or off (C{None}); forget what was learnt."""
        with self._lock:
            self._state = _State()
            self.config = config

    def route(self, scheme: str, host: str, port: int | None) -> RoutingConfig | None:
        """The config to route this call with, or C{None} to send it direct."""
        config = self.config
        if config is None:
            return None
        state = self._state
        if state.down_until and time.monotonic() < state.down_until:
            return None
        scheme = scheme.lower()
        if port is None:
            port = _DEFAULT_PORTS.get(scheme, 0)
        as_given = (scheme, host, port)
        decision = state.decisions.get(as_given)
        if decision is None:
            key = self.key(scheme, host, port)
            decision = config.decide(*key) and key not in state.refused
            if len(state.decisions) >= _MAX_DECISIONS:
                state.decisions.clear()
            state.decisions[as_given] = decision
        return config if decision else None

    def key(self, scheme: str, host: str, port: int | None) -> HostKey:
        """The normalised key for a target."""
        scheme = scheme.lower()
        return (scheme, host.lower().strip("[]"), port or _DEFAULT_PORTS.get(scheme, 0))

    def refused(self, key: HostKey) -> None:
        """The proxy refused this target by policy: send its calls direct from now on."""
        state = self._state
        with self._lock:
            if key not in state.refused:
                log.info(
                    "llmobserve: the proxy does not forward to %s://%s:%s by policy; "
                    "calls to it go direct (not tracked)",
                    *key,
                )
            state.refused.add(key)
            state.decisions[key] = False
        # Cached variants of the spelling (upper-case host, brackets) go too.
        for other in [k for k in state.decisions if self.key(*k) == key]:
            state.decisions[other] = False

    def confirmed(self, key: HostKey) -> None:
        """The proxy forwarded a call to this target (its policy admits it)."""
        self._state.confirmed.add(key)

    def is_confirmed(self, key: HostKey) -> bool:
        """Whether the proxy already forwarded a call to this target."""
        return key in self._state.confirmed

    def unreachable(self, error: BaseException) -> None:
        """The proxy refused the connection: go direct for a while, warn once."""
        state = self._state
        state.down_until = time.monotonic() + PROXY_RETRY_SECONDS
        if not state.warned_down:
            state.warned_down = True
            config = self.config
            log.warning(
                "llmobserve: proxy %s is unreachable (%s); calls go direct and are not "
                "tracked until it is back",
                config.proxy_url if config else "?",
                error,
            )

    def proxy_headers(self, config: RoutingConfig, target_url: str) -> list[tuple[str, str]]:
        """Headers to add to a routed call: Host, target, context, provider hint."""
        headers = [
            ("Host", config.authority),
            ("X-LLMObserve-Target-URL", target_url),
            *context_headers(),
        ]
        if config.api_key:
            headers.append(("X-LLMObserve-Key", config.api_key))
        return headers


#: The process-wide router every hook consults.
ROUTER = Router()
