"""Which outgoing calls go through the proxy, and what the SDK has learnt.

L{RoutingConfig} is the immutable answer to C{observe()}'s arguments;
L{Router} is the one mutable object the hooks consult on every call. Its
fast path is one dict lookup per call; everything else (parsing an IP,
matching suffixes) happens once per C{(scheme, host, port)}.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from llmobserve.sdk._context import context_headers

__all__ = [
    "ROUTER",
    "Router",
    "RoutingConfig",
    "is_policy_refusal",
    "refusal_reason",
    "split_authority",
]

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
    return _address_kind(host) is not None


def _address_kind(host: str) -> str | None:
    """Why a literal IP address stays direct (C{loopback}, C{private address}, ...),
    or C{None} for a public address or a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if not ip.is_global:
        return "private address"
    return None


def _shown(host: str, port: int) -> str:
    """C{host:port} as a user writes it in C{provider_hosts} (IPv6 bracketed)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


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
    proxy_port: int = field(init=False)
    proxy_hosts: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        scheme, host, port = split_authority(self.proxy_url)
        if scheme != "http" or not host:
            raise ValueError(f"proxy_url must be http://HOST:PORT, got {self.proxy_url!r}")
        shown = f"[{host}]" if ":" in host else host
        object.__setattr__(self, "authority", f"{shown}:{port}")
        object.__setattr__(self, "endpoint", f"http://{shown}:{port}/proxy")
        object.__setattr__(self, "exempt", self.exempt | {(host, port)})
        object.__setattr__(self, "proxy_port", port)
        # The names a client may give the proxy by (base-URL mode).
        names = {host}
        if host in _LOOPBACK_NAMES:
            names |= _LOOPBACK_NAMES
        object.__setattr__(self, "proxy_hosts", frozenset(names))
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
            # a key read from a file or a secret often ends in a newline: a
            # header cannot carry it (and the error would print the key)
            api_key=(api_key or "").strip() or None,
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

    def untracked_reason(self, scheme: str, host: str, port: int) -> str | None:
        """Why L{decide} sends a call direct when the user may not expect it.

        C{loopback}, C{private address}, ... for a local target that
        C{provider_hosts} does not name; C{None} when the call is routed or
        stays direct by the user's own choice (the proxy, the collector,
        C{exclude_hosts}, not HTTP).
        """
        if scheme not in _DEFAULT_PORTS or not host or (host, port) in self.exempt:
            return None
        if self.provider_for(host, port) is not None or self._excluded(host, port):
            return None
        if host == "localhost" or host.endswith(".localhost"):
            return "loopback"
        return _address_kind(host)

    def is_proxy(self, host: str, port: int | None) -> bool:
        """Whether C{host:port} is the proxy itself (a client in base-URL mode)."""
        return port == self.proxy_port and host.lower().strip("[]") in self.proxy_hosts


def is_policy_refusal(status: int, error_header: str | None) -> bool:
    """A proxy refusal that guarantees nothing went upstream (safe to send direct)."""
    return status == 403 and error_header is not None


def refusal_reason(error_header: str | None, body: bytes) -> str:
    """The proxy's reason for a refusal: its error kind and the body's message."""
    kind = error_header or "refused"
    try:
        message = json.loads(body[:4096])["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return kind
    return f"{kind}: {message}" if isinstance(message, str) and message else kind


@dataclass(slots=True)
class _State:
    decisions: dict[HostKey, bool] = field(default_factory=dict)
    refused: set[HostKey] = field(default_factory=set)
    confirmed: set[HostKey] = field(default_factory=set)
    warned_local: set[tuple[str, int]] = field(default_factory=set)
    warned_upgrade: set[tuple[str, int]] = field(default_factory=set)
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
            if not decision:
                self._say_untracked(config, key)
            if len(state.decisions) >= _MAX_DECISIONS:
                state.decisions.clear()
            state.decisions[as_given] = decision
        return config if decision else None

    def _say_untracked(self, config: RoutingConfig, key: HostKey) -> None:
        """Warn, once per host, that calls to a local target are not tracked."""
        reason = config.untracked_reason(*key)
        if reason is None:
            return
        where = (key[1], key[2])
        with self._lock:
            if where in self._state.warned_local:
                return
            self._state.warned_local.add(where)
        shown = _shown(*where)
        log.warning(
            "llmobserve: calls to %s are not tracked (%s); "
            'pass provider_hosts={"%s": "<provider>"} to track them',
            shown,
            reason,
            shown,
        )

    def upgrade_not_routed(self, scheme: str, host: str, port: int | None) -> None:
        """A routable call asks for a connection upgrade (WebSocket): it goes direct,
        and the first one per host says so."""
        key = self.key(scheme, host, port)
        where = (key[1], key[2])
        with self._lock:
            if where in self._state.warned_upgrade:
                return
            self._state.warned_upgrade.add(where)
        log.warning(
            "llmobserve: calls to %s that upgrade the connection (WebSocket) are not "
            "tracked: the proxy cannot relay them; they go direct",
            _shown(*where),
        )

    def to_proxy_headers(self, host: str, port: int | None) -> list[tuple[str, str]]:
        """Context headers for a call sent straight to the proxy (base-URL mode).

        Empty for every other target; a port comparison first, so direct
        calls pay next to nothing.
        """
        config = self.config
        if config is None or port != config.proxy_port or not config.is_proxy(host, port):
            return []
        return context_headers()

    def key(self, scheme: str, host: str, port: int | None) -> HostKey:
        """The normalised key for a target."""
        scheme = scheme.lower()
        return (scheme, host.lower().strip("[]"), port or _DEFAULT_PORTS.get(scheme, 0))

    def refused(self, key: HostKey, reason: str = "refused") -> None:
        """The proxy refused this target by policy: send its calls direct from now on.

        Said once per target, as a warning with the proxy's reason: these
        calls are not tracked.
        """
        state = self._state
        with self._lock:
            if key not in state.refused:
                log.warning(
                    "llmobserve: calls to %s://%s are NOT tracked: the proxy refused them "
                    "(%s); they go direct. %s",
                    key[0],
                    _shown(key[1], key[2]),
                    reason,
                    self._refusal_advice(key),
                )
            state.refused.add(key)
            state.decisions[key] = False
        # Cached variants of the spelling (upper-case host, brackets) go too.
        for other in [k for k in state.decisions if self.key(*k) == key]:
            state.decisions[other] = False

    def _refusal_advice(self, key: HostKey) -> str:
        """What to do about a refused target: name it, or, when C{provider_hosts}
        already names it, start the proxy with it (a proxy started by hand, e.g.
        by C{make run}, knows only the hosts on its own command line)."""
        config = self.config
        provider = config.provider_for(key[1], key[2]) if config else None
        if config is None or provider is None:
            return (
                "Name the host in provider_hosts, or start the proxy with "
                "--provider-host / --allow-host for it"
            )
        return (
            f"provider_hosts names it, but the proxy at {config.proxy_url} was not "
            "started with it: a proxy started by hand (make run, twistd) learns hosts "
            f"only from its command line; restart it with --provider-host "
            f"{_shown(key[1], key[2])}={provider}, or stop it and let observe() start one"
        )

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
