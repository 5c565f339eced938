"""The target policy: which upstream URLs the proxy may forward to, and where.

The target comes from the client, so it is hostile until checked (SSRF). Two
steps run before any byte goes upstream:

 1. L{parse_target} canonicalises the URL, purely and in a few microseconds:
    http and https only, no userinfo, no odd IP spellings, no control,
    space or percent characters in the host.
 2. L{TargetPolicy.check} resolves the host once, classifies I{every}
    address, and returns the checked address in a L{ResolvedTarget}. The
    relay connects to that address (pinning: no second resolution, so no
    DNS rebinding) while C{Host}, SNI and the certificate check keep the
    hostname.

Allowed by default: the registry's provider hosts and any host all of whose
addresses are public. Denied by default: loopback, private, link-local
(cloud metadata), CGNAT, multicast, reserved and documentation ranges, their
IPv4-mapped, 6to4 and NAT64 forms, the names C{localhost} and
C{*.localhost}. C{allow_cidrs} admit address ranges, C{allow_hosts} and
C{provider_hosts} admit names whatever they resolve to. Registry hosts get
no address exemption: a provider host that resolves privately (split DNS, a
poisoned C{/etc/hosts}) must be named in C{allow_hosts} too.

Ports: any port is allowed for an allowed host. The address, not the port,
is what makes a target dangerous, and OpenAI-compatible servers, vector
databases and gateways listen on all sorts of ports; the proxy's own
listening ports are refused as a loop (508).

Parsing is hand-written rather than done with hyperlink: hyperlink is
lenient by design and costs about 5 microseconds a URL, this parser is
strict and costs about 2.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import ip_network
from typing import Any, Final, Protocol
from urllib.parse import quote

import attrs
import idna
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from parsers.registry import REGISTRY

__all__ = [
    "DnsServerResolver",
    "ResolvedTarget",
    "Resolver",
    "StaticResolver",
    "Target",
    "TargetPolicy",
    "TargetRefused",
    "TwistedResolver",
    "parse_dns_server",
    "parse_target",
]

DEFAULT_PORTS: Final[Mapping[str, int]] = {"http": 80, "https": 443}

#: Status code of each refusal kind (DESIGN.md, proxy errors).
REFUSAL_STATUS: Final[Mapping[str, int]] = {
    "bad_target": 400,
    "not_allowed": 403,
    "unresolvable": 502,
    "loop": 508,
}

_MAX_URL = 16384
# scheme :// authority path ?query #fragment; a backslash ends nothing and
# is refused in the authority (WHATWG parsers treat it as "/").
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\\]*)(/[^?#]*)?(?:\?([^#]*))?(?:#.*)?", re.S)
_CTL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
# WHATWG "ends in a number": such a host is an IPv4 address to browsers and
# to inet_aton, in whatever spelling (0x7f.1, 2130706433, 0177.0.0.1, 127.1).
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
_PORT = re.compile(r"[0-9]{1,5}")
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


class TargetRefused(Exception):
    """The policy refuses a target; nothing was sent upstream.

    @ivar kind: C{bad_target} (400), C{not_allowed} (403), C{loop} (508) or
        C{unresolvable} (502: the name has no address, or resolution failed).
        It is the value of the C{X-LLMObserve-Error} header.
    @ivar status: the HTTP status the proxy answers with.
    @ivar message: a short reason, safe to log and to send to the client (no
        query string, control characters escaped).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.status = REFUSAL_STATUS[kind]
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def _show(text: str) -> str:
    """A bounded, escaped rendering of client text for messages and logs."""
    return ascii(text[:100])


def _bad(message: str) -> TargetRefused:
    return TargetRefused("bad_target", message)


@attrs.frozen
class Target:
    """A canonical, parsed target URL.

    @ivar scheme: C{http} or C{https}.
    @ivar host: lower case, IDNA-encoded, no trailing dot; an IP literal in
        its canonical form (IPv6 compressed, without brackets).
    @ivar port: always set, the scheme default when the URL named none.
    @ivar path: starts with C{/}; percent-escapes kept as sent.
    @ivar query: without the C{?}; empty when absent. The fragment is dropped.
    """

    scheme: str
    host: str
    port: int
    path: str = "/"
    query: str = ""

    @property
    def authority(self) -> str:
        """The C{Host} header value: host, plus C{:port} only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS.get(self.scheme):
            return host
        return f"{host}:{self.port}"

    @property
    def request_target(self) -> str:
        """The origin-form request target: path, plus C{?query} when there is one."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def url(self) -> str:
        """The whole URL. It may carry keys in its query: never log it."""
        return f"{self.scheme}://{self.authority}{self.request_target}"

    @property
    def is_ip_literal(self) -> bool:
        """True when the host is an IP address rather than a name."""
        return _literal_family(self.host) is not None


def _literal_family(host: str) -> int | None:
    """C{AF_INET}/C{AF_INET6} when C{host} is a canonical IP literal, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        return None
    return family


def parse_target(url: str) -> Target:
    """Parse and canonicalise an absolute http(s) URL given by a client.

    Pure, and remembered for the few hundred URLs last seen (a client
    calls the same few endpoints over and over). Raises only L{TargetRefused}
    with kind C{bad_target}, for anything malformed or ambiguous: another
    scheme or none, userinfo, an empty or bracketed non-IP host, control,
    space or percent characters, numeric hosts that are not a canonical
    dotted quad, ports outside 1-65535. Non-ASCII hosts are IDNA-encoded,
    non-ASCII path and query characters are percent-encoded as UTF-8.
    """
    try:
        return _PARSED[url]
    except (KeyError, TypeError):
        pass
    target = _parse_target(url)
    if len(url) <= _PARSED_URL_MAX:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[url] = target
    return target


_PARSED: dict[str, Target] = {}
_PARSED_MAX: Final = 512
_PARSED_URL_MAX: Final = 1024


def _parse_target(url: str) -> Target:
    if not isinstance(url, str):
        raise _bad("target URL is not text")
    if len(url) > _MAX_URL:
        raise _bad("target URL too long")
    if _CTL_OR_SPACE.search(url):
        raise _bad("control or space characters in target URL")
    m = _URL.fullmatch(url)
    if m is None:
        raise _bad("target is not an absolute http(s) URL")
    scheme_text, authority, path, query = m.groups()
    scheme = scheme_text.lower()
    default_port = DEFAULT_PORTS.get(scheme)
    if default_port is None:
        raise _bad(f"scheme {_show(scheme)} is not http or https")
    host, port = _parse_authority(authority, default_port)
    if not path:
        path = "/"
    if query is None:
        query = ""
    if not url.isascii():
        path = quote(path, safe=_PRINTABLE_ASCII)
        query = quote(query, safe=_PRINTABLE_ASCII)
    return Target(scheme, host, port, path, query)


def _parse_authority(authority: str, default_port: int) -> tuple[str, int]:
    if "@" in authority:
        raise _bad("userinfo in target URL")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _bad("unclosed bracket in target host")
        host = _canonical_ipv6(authority[1:close])
        rest = authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad("junk after bracketed target host")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_or_empty = authority.rpartition(":")
        if sep:
            port_text = port_text_or_empty
        else:
            host, port_text = port_text_or_empty, None
        host = _canonical_name_or_ipv4(host)
    if port_text is None:
        return host, default_port
    if _PORT.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
        raise _bad(f"bad port {_show(port_text)}")
    return host, int(port_text)


def _canonical_ipv6(text: str) -> str:
    """The compressed form of a bracketed IPv6 literal (no zone, no IPvFuture)."""
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        raise _bad(f"bracketed target host {_show(text)} is not an IPv6 address") from None


def _canonical_name_or_ipv4(text: str) -> str:
    host = text.lower()
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _bad(f"target host {_show(text)} is not a valid IDNA name") from None
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise _bad("empty target host")
    if ":" in host:
        raise _bad("IPv6 target host must be in brackets")
    if len(host) > 253 or _HOSTNAME.fullmatch(host) is None:
        raise _bad(f"invalid target host {_show(text)}")
    last_label = host.rpartition(".")[2]
    if _NUMERIC_LABEL.fullmatch(last_label):
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise _bad(f"ambiguous numeric target host {_show(text)}") from None
        if socket.inet_ntop(socket.AF_INET, packed) != host:  # paranoia: one spelling only
            raise _bad(f"ambiguous numeric target host {_show(text)}")
    return host


# --- addresses ---------------------------------------------------------------

_Net = tuple[int, int, str]  # network as int, mask as int, what the range is


def _nets(*specs: tuple[str, str]) -> tuple[_Net, ...]:
    out = []
    for cidr, label in specs:
        net = ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask), label))
    return tuple(out)


_V4_DENIED: Final = _nets(
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes broadcast 255.255.255.255
)

# IPv6: only global unicast 2000::/3 is public, minus these. Everything else
# (::1, ::, IPv4-compatible ::/96, fc00::/7, fe80::/10, ff00::/8, ...) is
# refused, except the prefixes that embed an IPv4 address, which are judged
# by that address.
_V6_GLOBAL: Final = _nets(("2000::/3", "global"))[0]
_V6_DENIED: Final = _nets(
    ("2001::/23", "IETF protocol"),  # Teredo, ORCHID, benchmarking, ...
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
)
_V6_NON_GLOBAL_NAMES: Final = _nets(  # only to name the refusal
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
_V6_MAPPED: Final = _nets(("::ffff:0:0/96", "IPv4-mapped"))[0]
_V6_NAT64: Final = _nets(("64:ff9b::/96", "NAT64"))[0]
_V6_6TO4: Final = _nets(("2002::/16", "6to4"))[0]

_MASK32 = 0xFFFFFFFF


def _in(value: int, net: _Net) -> bool:
    return value & net[1] == net[0]


def _address_int(address: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an int) for an IP string, or None.

    IPv4-mapped IPv6 addresses come back as IPv4: they reach the same host.
    A zone (C{fe80::1%eth0}) is ignored for classification.
    """
    if ":" in address:
        try:
            value = int.from_bytes(
                socket.inet_pton(socket.AF_INET6, address.partition("%")[0]), "big"
            )
        except OSError:
            return None
        if _in(value, _V6_MAPPED):
            return 4, value & _MASK32
        return 6, value
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        return None


def _v4_denial(value: int) -> str | None:
    for net in _V4_DENIED:
        if _in(value, net):
            return net[2]
    return None


def address_denial(address: str) -> str | None:
    """Why C{address} is not public (e.g. C{"loopback"}), or None when it is.

    The default address filter, before any C{allow_cidrs}. Anything that is
    not an IP address is refused.
    """
    parsed = _address_int(address)
    if parsed is None:
        return "unparseable"
    version, value = parsed
    if version == 4:
        return _v4_denial(value)
    if _in(value, _V6_NAT64):
        why = _v4_denial(value & _MASK32)
        return None if why is None else f"NAT64 {why}"
    if _in(value, _V6_6TO4):
        why = _v4_denial((value >> 80) & _MASK32)
        return None if why is None else f"6to4 {why}"
    if not _in(value, _V6_GLOBAL):
        for net in _V6_NON_GLOBAL_NAMES:
            if _in(value, net):
                return net[2]
        return "reserved IPv6"
    for net in _V6_DENIED:
        if _in(value, net):
            return net[2]
    return None


def _parse_cidrs(cidrs: Iterable[str]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for cidr in cidrs:
        net = ip_network(cidr, strict=False)
        if net.version == 6 and net.prefixlen >= 96 and _in(int(net.network_address), _V6_MAPPED):
            # ::ffff:a.b.c.d/N is the IPv4 range, as addresses are compared.
            net = ip_network((int(net.network_address) & _MASK32, net.prefixlen - 96), strict=False)
        out.append((net.version, int(net.network_address), int(net.netmask)))
    return tuple(out)


def _canonical_host_port(text: str) -> tuple[str, int | None]:
    """C{HOST[:PORT]} from configuration, canonicalised like a target."""
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address
    try:
        target = parse_target(f"http://{text}/")
    except TargetRefused as refused:
        raise ValueError(f"bad host {text!r}: {refused.message}") from None
    explicit = re.search(r":[0-9]+\Z", text) is not None
    return target.host, target.port if explicit else None


def _is_loopback(version: int, value: int) -> bool:
    return value >> 24 == 127 if version == 4 else value == 1


def _is_localhost(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


# --- resolvers ---------------------------------------------------------------


class Resolver(Protocol):
    """Turns a host name into IP address strings (the seam for fake DNS)."""

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        """All addresses of C{host}, in preference order; empty when none."""
        ...


@implementer(IResolutionReceiver)
class _AddressCollector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@attrs.frozen
class TwistedResolver:
    """L{Resolver} on the reactor's C{nameResolver} (getaddrinfo in a thread).

    @ivar clock: times lookups out; by default the reactor itself when it
        provides L{IReactorTime} (a real reactor does).
    @ivar timeout: seconds before a lookup fails (then the policy answers 502).
    """

    reactor: IReactorPluggableNameResolver
    clock: IReactorTime | None = None
    timeout: float = 10.0

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        collector = _AddressCollector()
        self.reactor.nameResolver.resolveHostName(collector, host, port)
        clock = self.clock
        if clock is None and IReactorTime.providedBy(self.reactor):
            clock = IReactorTime(self.reactor)
        if clock is not None:
            collector.done.addTimeout(self.timeout, clock)
        return collector.done


def parse_dns_server(spec: str) -> tuple[str, int]:
    """C{IP}, C{IP:PORT} or C{[IPv6]:PORT} as (address, port); port 53 by
    default. Raises C{ValueError} for anything else (a name would need a
    resolver of its own)."""
    spec = spec.strip()
    host, port = spec, "53"
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not [IPv6]:PORT: {spec!r}")
        port = rest[1:] or "53"
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {spec!r}")
    socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)  # OSError: not an IP
    return host, int(port)


@attrs.define
class DnsServerResolver:
    """L{Resolver} that asks the given DNS servers (C{--dns-server}) for A
    and AAAA records directly, instead of the system's resolver (getaddrinfo
    and its C{/etc/hosts}, C{nsswitch} and caches). Nothing is cached here:
    the policy's own verdict cache decides how long an answer is used.

    @ivar timeout: seconds before an unanswered query is sent again; after
        the last one the lookup fails (then the policy answers 502).
    """

    reactor: object
    servers: Sequence[tuple[str, int]]
    timeout: Sequence[float] = (1.0, 3.0)
    _client: object = attrs.field(default=None, init=False)

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        from twisted.names import client

        if self._client is None:  # twisted.names is loaded only when used
            self._client = client.Resolver(servers=list(self.servers), reactor=self.reactor)
        names: Any = self._client
        queries = [
            names.lookupAddress(host, timeout=self.timeout),
            names.lookupIPV6Address(host, timeout=self.timeout),
        ]
        return DeferredList(queries, consumeErrors=True).addCallback(_answered_addresses)


def _answered_addresses(results: list[tuple[bool, Any]]) -> list[str]:
    """The A then AAAA addresses of two lookups; a name that neither lookup
    found has none; any other failure of both (a timeout) is raised."""
    from twisted.names import dns
    from twisted.names.error import DNSNameError

    addresses: list[str] = []
    failures = []
    for ok, value in results:
        if not ok:
            failures.append(value)
            continue
        answers, _authority, _additional = value
        for record in answers:
            if record.type == dns.A:
                addresses.append(record.payload.dottedQuad())
            elif record.type == dns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    if not addresses and len(failures) == len(results):
        for failure in failures:
            if not failure.check(DNSNameError):
                failure.raiseException()
    return addresses


@attrs.define
class StaticResolver:
    """L{Resolver} answering from a mapping, for tests; records every lookup.

    Change C{answers} between calls to play a rebinding DNS server.
    """

    answers: dict[str, list[str]]
    calls: list[str] = attrs.field(factory=list)

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        self.calls.append(host)
        return succeed(list(self.answers.get(host, ())))


@attrs.frozen
class OverrideResolver:
    """L{Resolver} with fixed answers for some names (C{--resolve}), else C{fallback}.

    Like curl's C{--resolve}: the name is still checked by the policy, and
    the overriding address still goes through the address filter.
    """

    overrides: Mapping[str, Sequence[str]]
    fallback: Resolver

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        fixed = self.overrides.get(host)
        if fixed is not None:
            return succeed(list(fixed))
        return self.fallback.resolve(host, port)


# --- the policy --------------------------------------------------------------


@attrs.frozen
class ResolvedTarget:
    """A target that passed the policy, and where to connect for it.

    @ivar address: the checked IP to connect to (the first of C{addresses}).
        C{Host}, SNI and the certificate name stay C{target.host}.
    @ivar addresses: every resolved address, all checked, in resolver order
        (for a relay that wants to fall back on connect failure).
    @ivar provider_hint: the provider id from C{provider_hosts}, or None.
    """

    target: Target
    address: str
    addresses: tuple[str, ...]
    provider_hint: str | None = None


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_CACHE_MAX = 1024


class TargetPolicy:
    """Decides whether a L{Target} may be forwarded to, and pins its address.

    @param resolver: looks names up (L{TwistedResolver} in the proxy).
    @param allow_cidrs: address ranges admitted despite the default filter.
    @param allow_hosts: names (exact, or C{*.suffix} for strict subdomains
        on a label boundary) admitted whatever they resolve to. An IP
        literal may be named too.
    @param provider_hosts: C{HOST[:PORT]} to provider id, from
        C{--provider-host}: admitted like C{allow_hosts}, and the id is
        carried as C{provider_hint}.
    @param known_hosts_only: only registry hosts, C{allow_hosts},
        C{provider_hosts} (and IP literals inside C{allow_cidrs}) pass.
    @param own_addresses: C{(ip, port)} pairs the proxy listens on; a
        target that resolves to one is a loop (508). C{0.0.0.0} or C{::}
        stand for any loopback or unspecified address on that port.
    @param clock: when given, successful checks of names are cached for
        C{cache_seconds} per (host, port), so a hot host costs one dict
        lookup instead of a getaddrinfo thread hop. Pinning still holds:
        every request connects to an address that was checked, at most
        C{cache_seconds} ago (DNS TTLs of provider hosts are longer).
        Refusals are never cached. Without a clock nothing is cached.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        allow_cidrs: Iterable[str] = (),
        allow_hosts: Iterable[str] = (),
        provider_hosts: Mapping[str, str] | None = None,
        known_hosts_only: bool = False,
        own_addresses: Iterable[tuple[str, int]] = (),
        clock: IReactorTime | None = None,
        cache_seconds: float = 5.0,
    ) -> None:
        self._resolver = resolver
        self._allow_cidrs = _parse_cidrs(allow_cidrs)
        self._allow_exact: set[str] = set()
        self._allow_suffixes: set[str] = set()
        for pattern in allow_hosts:
            self._add_allow_host(pattern)
        self._provider_hosts: dict[tuple[str, int | None], str] = {}
        for spec, provider in (provider_hosts or {}).items():
            if not provider:
                raise ValueError(f"provider host {spec!r} names no provider")
            self._provider_hosts[_canonical_host_port(spec)] = provider
        self._known_hosts_only = known_hosts_only
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cache: dict[tuple[str, int], tuple[float, ResolvedTarget]] = {}
        self._verdicts: dict[str, str | None] = {}
        self._literals: dict[tuple[str, str, int], tuple[ResolvedTarget, bool]] = {}
        self._own: set[tuple[str, int]] = set()
        self._own_wildcard_ports: set[int] = set()
        self._own_local_ports: set[int] = set()  # loopback or wildcard: "localhost:PORT"
        for host, port in own_addresses:
            self.add_own_address(host, port)

    def _add_allow_host(self, pattern: str) -> None:
        text = pattern.strip()
        if text.startswith("*."):
            host, _ = _canonical_host_port(text[2:])
            self._allow_suffixes.add("." + host)
        else:
            host, _ = _canonical_host_port(text)
            self._allow_exact.add(host)

    def add_own_address(self, host: str, port: int) -> None:
        """Register an address the proxy listens on (call it once bound)."""
        parsed = _address_int(host) if host not in _WILDCARDS else None
        if host in _WILDCARDS or (parsed is not None and parsed[1] == 0):
            self._own_wildcard_ports.add(port)
            self._own_local_ports.add(port)
        elif parsed is not None:
            self._own.add((_canonical_address(host), port))
            if _is_loopback(*parsed):
                self._own_local_ports.add(port)
        else:
            self._own.add((host.lower().rstrip("."), port))
            if _is_localhost(host.lower().rstrip(".")):
                self._own_local_ports.add(port)
        self._cache.clear()
        self._literals.clear()

    def check(self, target: Target) -> Deferred[ResolvedTarget]:
        """Resolve once, check every address; errback with L{TargetRefused}.

        Fires synchronously for IP literals, cached names and refusals
        decided by name.
        """
        try:
            resolved, hint, trusted = self._decide(target)
        except TargetRefused as refused:
            return fail(refused)
        if resolved is not None:
            return succeed(resolved)
        resolving = self._resolver.resolve(target.host, target.port)
        return resolving.addCallbacks(
            lambda addresses: self._resolved(target, addresses, hint, trusted),
            self._resolution_failed,
            errbackArgs=(target,),
        )

    def check_now(self, target: Target) -> ResolvedTarget | None:
        """Decide without a lookup when possible, for a Deferred-free hot path.

        Returns the L{ResolvedTarget} for IP literals and cached names,
        raises L{TargetRefused} for refusals decided by name or literal
        address, and returns None when the name must be resolved: then
        call L{check}.
        """
        return self._decide(target)[0]

    def _decide(self, target: Target) -> tuple[ResolvedTarget | None, str | None, bool]:
        key = (target.scheme, target.host, target.port)
        known = self._literals.get(key)
        if known is not None:
            resolved, trusted = known
            if resolved.target is not target:
                resolved = attrs.evolve(resolved, target=target)
                self._literals[key] = (resolved, trusted)
            return resolved, resolved.provider_hint, trusted
        hint, trusted = self._check_name(target)
        if _literal_family(target.host) is not None:
            resolved = self._verify(target, [target.host], hint, trusted)
            # An admitted IP literal stays admitted until the proxy's own
            # addresses change: its verdict depends on nothing else.
            if len(self._literals) >= _CACHE_MAX:
                self._literals.clear()
            self._literals[key] = (resolved, trusted)
            return resolved, hint, trusted
        return self._cached(target), hint, trusted

    def _check_name(self, target: Target) -> tuple[str | None, bool]:
        if target.scheme not in DEFAULT_PORTS:
            raise _bad(f"scheme {_show(target.scheme)} is not http or https")
        host = target.host
        if (host, target.port) in self._own:
            raise TargetRefused("loop", "target is the proxy itself")
        hint = self._provider_hosts.get((host, target.port))
        if hint is None:
            hint = self._provider_hosts.get((host, None))
        trusted = hint is not None or self._allowed_name(host)
        if trusted:
            return hint, True
        if self._known_hosts_only and REGISTRY.for_host(host) is None:
            if not (_literal_family(host) is not None and self._in_allow_cidrs(host)):
                raise TargetRefused("not_allowed", f"{_show(host)} is not a known host")
        if _is_localhost(host):
            if target.port in self._own_local_ports:
                raise TargetRefused("loop", "target is the proxy itself")
            raise TargetRefused("not_allowed", f"{_show(host)} is a local name")
        return None, False

    def _allowed_name(self, host: str) -> bool:
        if host in self._allow_exact:
            return True
        if self._allow_suffixes:
            dot = host.find(".")
            while dot >= 0:
                if host[dot:] in self._allow_suffixes:
                    return True
                dot = host.find(".", dot + 1)
        return False

    def _cached(self, target: Target) -> ResolvedTarget | None:
        if self._clock is None:
            return None
        entry = self._cache.get((target.host, target.port))
        if entry is None:
            return None
        expires, resolved = entry
        if self._clock.seconds() >= expires:
            del self._cache[(target.host, target.port)]
            return None
        if resolved.target != target:
            resolved = attrs.evolve(resolved, target=target)
        return resolved

    def _resolved(
        self, target: Target, addresses: list[str], hint: str | None, trusted: bool
    ) -> ResolvedTarget:
        resolved = self._verify(target, addresses, hint, trusted)
        if self._clock is not None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            expires = self._clock.seconds() + self._cache_seconds
            self._cache[(target.host, target.port)] = (expires, resolved)
        return resolved

    def _resolution_failed(self, failure: Failure, target: Target) -> ResolvedTarget:
        if isinstance(failure.value, TargetRefused):
            raise failure.value
        raise TargetRefused(
            "unresolvable",
            f"cannot resolve {_show(target.host)}: {type(failure.value).__name__}",
        )

    def _verify(
        self, target: Target, addresses: Sequence[str], hint: str | None, trusted: bool
    ) -> ResolvedTarget:
        if not addresses:
            raise TargetRefused("unresolvable", f"{_show(target.host)} has no address")
        for address in addresses:
            if self._is_own(address, target.port):
                raise TargetRefused("loop", "target is the proxy itself")
            if trusted:
                if _address_int(address) is None:
                    raise TargetRefused(
                        "unresolvable", f"{_show(target.host)} resolved to a non-address"
                    )
                continue
            why = self._denial(address)
            if why is not None:
                raise TargetRefused(
                    "not_allowed",
                    f"{_show(target.host)} resolves to a {why} address"
                    # what the proxy's operator can do about it (the first
                    # thing a newcomer with a local fake upstream meets)
                    " (the proxy admits one with --provider-host HOST:PORT=PROVIDER,"
                    " --allow-host or --allow-cidr)",
                )
        return ResolvedTarget(target, addresses[0], tuple(addresses), hint)

    def _is_own(self, address: str, port: int) -> bool:
        if self._own and (_canonical_address(address), port) in self._own:
            return True
        if port in self._own_wildcard_ports:
            parsed = _address_int(address)
            return parsed is not None and (parsed[1] == 0 or _is_loopback(*parsed))
        return False

    def _denial(self, address: str) -> str | None:
        try:
            return self._verdicts[address]
        except KeyError:
            pass
        why = None if self._in_allow_cidrs(address) else address_denial(address)
        if len(self._verdicts) >= _CACHE_MAX:
            self._verdicts.clear()
        self._verdicts[address] = why
        return why

    def _in_allow_cidrs(self, address: str) -> bool:
        if not self._allow_cidrs:
            return False
        parsed = _address_int(address)
        if parsed is None:
            return False
        version, value = parsed
        return any(v == version and value & mask == net for v, net, mask in self._allow_cidrs)


def _canonical_address(address: str) -> str:
    """The canonical text of an IP address, IPv4-mapped IPv6 as IPv4."""
    parsed = _address_int(address)
    if parsed is None:
        return address
    version, value = parsed
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
