"""The target policy: SSRF vectors, pinning, overrides and loop detection.

Pure and synchronous: a StaticResolver stands in for DNS, no socket is opened,
and the "public" addresses below are only ever classified, never connected to.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorPluggableNameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llmobserve.proxy._policy import (
    DnsServerResolver,
    ResolvedTarget,
    StaticResolver,
    Target,
    TargetPolicy,
    TargetRefused,
    TwistedResolver,
    address_denial,
    parse_dns_server,
    parse_target,
)

T = TypeVar("T")

PUBLIC4 = "93.184.215.14"
PUBLIC6 = "2606:4700::1"


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired; raise its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    result: T = out[0]
    return result


def refusal(policy: TargetPolicy, url: str) -> TargetRefused:
    """Run a URL through parse + check as the relay does; return the refusal."""
    with pytest.raises(TargetRefused) as info:
        result_of(policy.check(parse_target(url)))
    return info.value


def allowed(policy: TargetPolicy, url: str) -> ResolvedTarget:
    return result_of(policy.check(parse_target(url)))


def make_policy(**kwargs: Any) -> tuple[TargetPolicy, StaticResolver]:
    resolver = StaticResolver(
        {
            "public.example": [PUBLIC4, PUBLIC6],
            "api.openai.com": ["162.159.140.245"],
            "api.corp.example": ["10.1.2.3"],
            "a.b.corp.example": ["10.1.2.4"],
            "corp.example": ["10.1.2.5"],
            "evilcorp.example": ["10.1.2.6"],
            "vllm.lan": ["192.168.1.20"],
            "gw.lan": ["10.9.9.9"],
            "mixed.example": [PUBLIC4, "10.0.0.1"],
            "loopy.example": ["127.0.0.1"],
            "metadata.example": ["169.254.169.254"],
            "mapped.example": ["::ffff:169.254.169.254"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    return TargetPolicy(resolver, **kwargs), resolver


# --- the §2.5 vector table ------------------------------------------------------

BAD_TARGET = [
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://0/",
    "http://127.0.0.01/",
    "https://api.openai.com@127.0.0.1/",
    "https://user:pw@api.openai.com/",
    "http://[example.com]/",
    "http://[127.0.0.1]/",
    "http://[fe80::1%25eth0]/",
    "http://[::1/",
    "http://::1/",
    "ftp://api.openai.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_x",
    "api.openai.com/v1/chat/completions",
    "//api.openai.com/v1",
    "/v1/chat/completions",
    "",
    "http:///v1",
    "http://:443/",
    "http://api.openai.com\r\nX-Injected: 1/",
    "http://api.openai.com\n/",
    "http://api.openai.com%0d%0aInjected:%201/",
    "http://api.open ai.com/",
    "http://api.openai.com\x00.evil/",
    "http://api%2eopenai.com/",
    "http://api.openai.com:0/",
    "http://api.openai.com:65536/",
    "http://api.openai.com:+443/",
    "http://api.openai.com:/",
    "http://api.openai.com\\@127.0.0.1/",
    "http://-bad-.example/",
    "http://a..b/",
    "http://x\u2028y/",
    "https://api.openai.com/v1/chat\r\nInjected: 1",
]


@pytest.mark.parametrize("url", BAD_TARGET)
def test_malformed_targets_are_bad_target(url: str) -> None:
    """Odd spellings, userinfo, other schemes and injected characters give 400."""
    with pytest.raises(TargetRefused) as info:
        parse_target(url)
    assert info.value.kind == "bad_target"
    assert info.value.status == 400
    assert info.value.message.isprintable() and info.value.message.isascii()


NOT_ALLOWED = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1/",
    "http://127.255.255.254:8080/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of the metadata address
    "http://[2002:7f00:1::1]/",  # 6to4 of loopback
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
    "http://192.0.2.1/",
    "http://[2001:db8::1]/",
    "http://localhost/",
    "http://localhost./",
    "http://LOCALHOST:9000/",
    "http://app.localhost/",
    "http://loopy.example/",
    "http://metadata.example/",
    "http://mapped.example/",
    "http://mixed.example/",
]


@pytest.mark.parametrize("url", NOT_ALLOWED)
def test_non_public_targets_are_not_allowed(url: str) -> None:
    """Local, private, reserved and metadata targets, literal or resolved, give 403."""
    policy, _ = make_policy()
    refused = refusal(policy, url)
    assert (refused.kind, refused.status) == ("not_allowed", 403)
    assert refused.message.isprintable() and refused.message.isascii()


def test_a_denied_address_names_the_options_that_admit_it() -> None:
    """A newcomer pointing the proxy at a fake upstream on 127.0.0.1 reads
    what to start the proxy with, not only why it refused."""
    policy, _ = make_policy()
    message = refusal(policy, "http://127.0.0.1:8080/").message
    assert "loopback" in message
    for option in ("--provider-host", "--allow-host", "--allow-cidr"):
        assert option in message


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("fd00:ec2::254", "unique-local"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "NAT64 private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("255.255.255.255", "reserved"),
        ("not an address", "unparseable"),
        (PUBLIC4, None),
        (PUBLIC6, None),
        ("64:ff9b::5db8:d70e", None),  # NAT64 of a public address
    ],
)
def test_address_denial_names_the_range(address: str, why: str | None) -> None:
    """The address filter says which range refused an address."""
    assert address_denial(address) == why


# --- allowed targets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [("https://93.184.215.14/v1", PUBLIC4), ("https://[2606:4700::1]:8443/", PUBLIC6)],
)
def test_public_literals_are_allowed_without_resolution(url: str, address: str) -> None:
    """A public IP literal passes and is its own pinned address; no lookup happens."""
    policy, resolver = make_policy()
    resolved = allowed(policy, url)
    assert resolved.address == address
    assert resolved.addresses == (address,)
    assert resolver.calls == []


def test_public_name_is_allowed_and_pinned() -> None:
    """A name whose every address is public passes; the first address is pinned."""
    policy, resolver = make_policy()
    resolved = allowed(policy, "https://Public.Example./v1/x?a=1")
    assert resolved.address == PUBLIC4
    assert resolved.addresses == (PUBLIC4, PUBLIC6)
    assert resolved.target == Target("https", "public.example", 443, "/v1/x", "a=1")
    assert resolved.provider_hint is None
    assert resolver.calls == ["public.example"]


def test_registry_host_is_allowed() -> None:
    """A provider host from the registry passes (and still had its address checked)."""
    policy, _ = make_policy()
    assert allowed(policy, "https://API.OPENAI.COM./v1/chat/completions").address == (
        "162.159.140.245"
    )


def test_dns_rebinding_is_pinned() -> None:
    """The checked address is the one returned; a later answer changes nothing."""
    policy, resolver = make_policy()
    resolver.answers["rebind.example"] = [PUBLIC4]
    d = policy.check(parse_target("https://rebind.example/"))
    resolver.answers["rebind.example"] = ["127.0.0.1"]
    resolved = result_of(d)
    assert resolved.address == PUBLIC4
    assert resolver.calls == ["rebind.example"]
    # The next request resolves afresh, sees loopback and is refused.
    assert refusal(policy, "https://rebind.example/").kind == "not_allowed"
    assert resolver.calls == ["rebind.example", "rebind.example"]


def test_cache_with_clock_skips_resolution_until_expiry() -> None:
    """With a clock, a checked name is reused for cache_seconds, then resolved again."""
    clock = Clock()
    policy, resolver = make_policy(clock=clock, cache_seconds=5.0)
    resolver.answers["rebind.example"] = [PUBLIC4]
    first = allowed(policy, "https://rebind.example/a")
    resolver.answers["rebind.example"] = ["127.0.0.1"]
    second = allowed(policy, "https://rebind.example/b?x=1")
    assert second.address == first.address == PUBLIC4
    assert second.target.path == "/b" and second.target.query == "x=1"
    assert resolver.calls == ["rebind.example"]
    clock.advance(5.0)
    assert refusal(policy, "https://rebind.example/").kind == "not_allowed"
    assert resolver.calls == ["rebind.example", "rebind.example"]


def test_check_now_decides_without_deferreds_when_it_can() -> None:
    """check_now answers literals and cached names, refuses by name, else says "look up"."""
    clock = Clock()
    policy, resolver = make_policy(clock=clock)
    assert policy.check_now(parse_target(f"https://{PUBLIC4}/")) == ResolvedTarget(
        parse_target(f"https://{PUBLIC4}/"), PUBLIC4, (PUBLIC4,)
    )
    with pytest.raises(TargetRefused):
        policy.check_now(parse_target("http://169.254.169.254/"))
    with pytest.raises(TargetRefused):
        policy.check_now(parse_target("http://localhost/"))
    target = parse_target("https://public.example/")
    assert policy.check_now(target) is None
    assert resolver.calls == []
    allowed(policy, "https://public.example/")
    cached = policy.check_now(target)
    assert cached is not None and cached.address == PUBLIC4
    assert resolver.calls == ["public.example"]


# --- overrides ----------------------------------------------------------------------


def test_allow_cidrs_admit_an_explicit_range() -> None:
    """allow_cidrs admit loopback for tests, literal or resolved, and nothing more."""
    policy, _ = make_policy(allow_cidrs=["127.0.0.1/32"])
    assert allowed(policy, "http://127.0.0.1:8080/").address == "127.0.0.1"
    assert allowed(policy, "http://[::ffff:127.0.0.1]:8080/").address == "::ffff:127.0.0.1"
    assert allowed(policy, "http://loopy.example:8080/").address == "127.0.0.1"
    assert refusal(policy, "http://127.0.0.2/").kind == "not_allowed"
    assert refusal(policy, "http://[::1]/").kind == "not_allowed"
    # Names are still refused by name: allow_hosts, not allow_cidrs, admits localhost.
    assert refusal(policy, "http://localhost:8080/").kind == "not_allowed"


def test_allow_hosts_exact_and_suffix() -> None:
    """allow_hosts admit names resolving privately; *.suffix matches on label boundaries."""
    policy, _ = make_policy(allow_hosts=["vllm.lan", "*.Corp.Example.", "localhost"])
    assert allowed(policy, "http://vllm.lan:8000/v1").address == "192.168.1.20"
    assert allowed(policy, "https://api.corp.example/").address == "10.1.2.3"
    assert allowed(policy, "https://a.b.corp.example/").address == "10.1.2.4"
    assert allowed(policy, "http://localhost:8080/").address == "127.0.0.1"
    assert refusal(policy, "https://corp.example/").kind == "not_allowed"
    assert refusal(policy, "https://evilcorp.example/").kind == "not_allowed"
    assert refusal(policy, "http://metadata.example/").kind == "not_allowed"


def test_allow_hosts_may_name_an_ip() -> None:
    """An IP named in allow_hosts is admitted as written, other spellings still refused."""
    policy, _ = make_policy(allow_hosts=["10.0.0.5", "fd00::1"])
    assert allowed(policy, "http://10.0.0.5:8000/").address == "10.0.0.5"
    assert allowed(policy, "http://[fd00:0::1]/").address == "fd00::1"
    assert refusal(policy, "http://10.0.0.6/").kind == "not_allowed"


def test_provider_hosts_admit_and_carry_the_provider() -> None:
    """--provider-host entries pass like allow_hosts and set provider_hint."""
    policy, _ = make_policy(provider_hosts={"vllm.lan:8000": "openai", "GW.lan": "anthropic"})
    resolved = allowed(policy, "http://vllm.lan:8000/v1/chat/completions")
    assert (resolved.address, resolved.provider_hint) == ("192.168.1.20", "openai")
    assert allowed(policy, "https://gw.lan/v1/messages").provider_hint == "anthropic"
    assert allowed(policy, "http://gw.lan:8080/").provider_hint == "anthropic"
    # The port is part of a HOST:PORT entry.
    assert refusal(policy, "http://vllm.lan:9999/").kind == "not_allowed"


def test_known_hosts_only() -> None:
    """known_hosts_only refuses unknown public hosts, keeps the registry and allowlists."""
    policy, resolver = make_policy(
        known_hosts_only=True,
        allow_hosts=["vllm.lan"],
        provider_hosts={"gw.lan": "anthropic"},
        allow_cidrs=["127.0.0.1/32"],
    )
    refused = refusal(policy, "https://public.example/")
    assert (refused.kind, refused.status) == ("not_allowed", 403)
    assert refusal(policy, f"https://{PUBLIC4}/").kind == "not_allowed"
    assert resolver.calls == []  # refused by name, before any lookup
    assert allowed(policy, "https://api.openai.com/v1/models").address == "162.159.140.245"
    assert allowed(policy, "http://vllm.lan/").address == "192.168.1.20"
    assert allowed(policy, "http://gw.lan/").provider_hint == "anthropic"
    assert allowed(policy, "http://127.0.0.1:8080/").address == "127.0.0.1"


def test_bad_configuration_is_refused_at_start() -> None:
    """Malformed allow_hosts / provider_hosts / allow_cidrs raise ValueError."""
    for kwargs in (
        {"allow_hosts": ["a b"]},
        {"allow_hosts": ["*."]},
        {"provider_hosts": {"x@y": "openai"}},
        {"provider_hosts": {"ok.example": ""}},
        {"allow_cidrs": ["10.0.0.0/33"]},
    ):
        with pytest.raises(ValueError):
            make_policy(**kwargs)


# --- loops ----------------------------------------------------------------------------


def test_own_address_is_a_loop_even_when_loopback_is_denied() -> None:
    """A target at the proxy's own address and port gives 508, not 403."""
    policy, _ = make_policy(own_addresses=[("127.0.0.1", 9000)])
    for url in (
        "http://127.0.0.1:9000/health",
        "http://[::ffff:127.0.0.1]:9000/",
        "http://loopy.example:9000/",
        "https://127.0.0.1:9000/",
    ):
        refused = refusal(policy, url)
        assert (refused.kind, refused.status) == ("loop", 508), url
    assert refusal(policy, "http://127.0.0.1:9001/").kind == "not_allowed"
    # localhost is refused by name without a lookup, but at our port it is a loop.
    assert refusal(policy, "http://localhost:9000/").status == 508
    assert refusal(policy, "http://localhost:9001/").status == 403


def test_own_address_loop_wins_over_allow_lists() -> None:
    """Even an allowed host or range cannot point the proxy at itself."""
    policy, _ = make_policy(allow_cidrs=["127.0.0.0/8"], allow_hosts=["localhost"])
    assert allowed(policy, "http://127.0.0.1:9000/").address == "127.0.0.1"
    policy.add_own_address("127.0.0.1", 9000)
    assert refusal(policy, "http://127.0.0.1:9000/").kind == "loop"
    assert refusal(policy, "http://localhost:9000/").kind == "loop"
    assert allowed(policy, "http://127.0.0.1:9001/").address == "127.0.0.1"


def test_wildcard_listener_loops_on_any_local_address() -> None:
    """Listening on 0.0.0.0 or :: makes loopback and unspecified targets on that port loops."""
    policy, _ = make_policy(own_addresses=[("::", 9000)], allow_cidrs=["127.0.0.0/8"])
    for url in ("http://127.0.0.2:9000/", "http://[::1]:9000/", "http://0.0.0.0:9000/"):
        assert refusal(policy, url).kind == "loop", url
    assert allowed(policy, "http://127.0.0.2:9001/").address == "127.0.0.2"


def test_add_own_address_drops_cached_answers() -> None:
    """A port bound after a cached check still counts as a loop."""
    clock = Clock()
    policy, _ = make_policy(clock=clock, allow_hosts=["localhost"])
    assert allowed(policy, "http://localhost:9000/").address == "127.0.0.1"
    policy.add_own_address("127.0.0.1", 9000)
    assert refusal(policy, "http://localhost:9000/").kind == "loop"


# --- resolution failures and resolvers -------------------------------------------------


def test_unresolvable_names() -> None:
    """No address, or a resolver error, refuses with 502 before anything is sent."""
    policy, _ = make_policy()
    refused = refusal(policy, "https://nowhere.example/")
    assert (refused.kind, refused.status) == ("unresolvable", 502)

    class Broken:
        def resolve(self, host: str, port: int) -> Deferred[list[str]]:
            return fail(DNSLookupError(host))

    refused = refusal(TargetPolicy(Broken()), "https://broken.example/")
    assert (refused.kind, refused.status) == ("unresolvable", 502)


def test_directly_built_target_is_still_checked() -> None:
    """A Target built by hand with another scheme is refused, not forwarded."""
    policy, _ = make_policy()
    with pytest.raises(TargetRefused) as info:
        result_of(policy.check(Target("ftp", PUBLIC4, 21)))
    assert info.value.kind == "bad_target"


class FakeNameResolver:
    """An IHostnameResolver answering synchronously, with a duplicate address."""

    def resolveHostName(
        self,
        receiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> None:
        receiver.resolutionBegan(object())  # type: ignore[arg-type]  # the receiver never reads it
        receiver.addressResolved(IPv4Address("TCP", PUBLIC4, portNumber))
        receiver.addressResolved(IPv6Address("TCP", PUBLIC6, portNumber))
        receiver.addressResolved(IPv4Address("TCP", PUBLIC4, portNumber))
        receiver.resolutionComplete()


class FakeReactor:
    nameResolver = FakeNameResolver()


def test_twisted_resolver_collects_unique_addresses() -> None:
    """TwistedResolver turns IHostnameResolver callbacks into a list of IP strings."""
    resolver = TwistedResolver(FakeReactor())  # type: ignore[arg-type]  # only nameResolver is used
    assert result_of(resolver.resolve("public.example", 443)) == [PUBLIC4, PUBLIC6]


def test_trusted_name_must_still_resolve_to_addresses() -> None:
    """An allowed name whose resolver answers garbage is refused, not connected to."""
    policy, resolver = make_policy(allow_hosts=["odd.lan"])
    resolver.answers["odd.lan"] = ["not-an-ip"]
    assert refusal(policy, "http://odd.lan/").kind == "unresolvable"


def test_twisted_resolver_times_out() -> None:
    """A lookup that never completes fails after the timeout (then 502)."""

    class Silent:
        def resolveHostName(self, receiver: IResolutionReceiver, *args: object) -> None:
            pass

    class SilentReactor:
        nameResolver = Silent()

    clock = Clock()
    resolver = TwistedResolver(SilentReactor(), clock=clock, timeout=2.0)  # type: ignore[arg-type]  # a fake
    d = TargetPolicy(resolver).check(parse_target("https://slow.example/"))
    clock.advance(2.0)
    with pytest.raises(TargetRefused) as info:
        result_of(d)
    assert info.value.kind == "unresolvable"


# --- canonical form ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected", "authority"),
    [
        (
            "HTTPS://API.OpenAI.com.:443/v1/chat?x=1#frag",
            Target("https", "api.openai.com", 443, "/v1/chat", "x=1"),
            "api.openai.com",
        ),
        ("http://example.com", Target("http", "example.com", 80, "/", ""), "example.com"),
        ("http://example.com:443/", Target("http", "example.com", 443), "example.com:443"),
        ("https://[2606:4700:0::0001]/", Target("https", PUBLIC6, 443), "[2606:4700::1]"),
        ("https://[::1]:8443/", Target("https", "::1", 8443), "[::1]:8443"),
        ("http://1.2.3.4:8000?q", Target("http", "1.2.3.4", 8000, "/", "q"), "1.2.3.4:8000"),
        (
            "https://bücher.example/ä?q=ü",
            Target("https", "xn--bcher-kva.example", 443, "/%C3%A4", "q=%C3%BC"),
            "xn--bcher-kva.example",
        ),
        (
            "https://x.example/a%0d%0ab",
            Target("https", "x.example", 443, "/a%0d%0ab"),
            "x.example",
        ),
        ("http://under_score.example/", Target("http", "under_score.example", 80), None),
    ],
)
def test_canonical_form(url: str, expected: Target, authority: str | None) -> None:
    """Targets come out lower-case, IDNA, default port filled, fragment dropped."""
    target = parse_target(url)
    assert target == expected
    if authority is not None:
        assert target.authority == authority
    assert parse_target(target.url) == target


def test_request_target_and_url() -> None:
    """request_target is the origin form; url round-trips."""
    target = parse_target("https://api.openai.com:443/v1/models?limit=2")
    assert target.request_target == "/v1/models?limit=2"
    assert target.url == "https://api.openai.com/v1/models?limit=2"
    assert target.is_ip_literal is False
    assert parse_target("http://[::1]/").is_ip_literal is True


@given(st.text(max_size=200))
def test_parse_target_is_total(text: str) -> None:
    """On arbitrary text parse_target returns a Target or raises TargetRefused, nothing else."""
    for candidate in (text, "http://" + text, "https://api.openai.com" + text):
        try:
            target = parse_target(candidate)
        except TargetRefused as refused:
            assert refused.kind == "bad_target"
        else:
            assert parse_target(target.url) == target


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60))
def test_check_is_total(text: str) -> None:
    """Whatever parses, check answers with a ResolvedTarget or a TargetRefused."""
    policy, _ = make_policy()
    try:
        target = parse_target("http://" + text)
    except TargetRefused:
        return
    try:
        resolved = result_of(policy.check(target))
    except TargetRefused as refused:
        assert refused.kind in {"not_allowed", "unresolvable"}
    else:
        assert resolved.target == target


@pytest_twisted.ensureDeferred
async def test_twisted_resolver_on_the_real_reactor() -> None:
    """On the real reactor (getaddrinfo in a thread, numeric so no DNS) it answers IPs."""
    from twisted.internet import reactor

    resolver = TwistedResolver(IReactorPluggableNameResolver(reactor))
    assert await resolver.resolve("127.0.0.1", 80) == ["127.0.0.1"]
    assert await resolver.resolve("::1", 80) == ["::1"]


# -- --dns-server ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "server"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.0.0.53:53 ", ("10.0.0.53", 53)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
    ],
)
def test_dns_server_specs(spec: str, server: tuple[str, int]) -> None:
    assert parse_dns_server(spec) == server


@pytest.mark.parametrize(
    "spec", ["", "dns.example", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", "[::1", "[::1]x"]
)
def test_bad_dns_server_specs_are_refused(spec: str) -> None:
    with pytest.raises((ValueError, OSError)):
        parse_dns_server(spec)


@pytest_twisted.ensureDeferred
async def test_dns_server_resolver_asks_for_a_and_aaaa() -> None:
    """Both address families, IPv4 first, from a real DNS server on loopback;
    an unknown name has no address (the policy's 502), and nothing is cached."""
    from support.fakedns import FakeDNS
    from twisted.internet import reactor

    with FakeDNS({"both.test": ["127.0.0.1", "::1"], "v6.test": ["::1"]}) as names:
        resolver = DnsServerResolver(reactor, [("127.0.0.1", names.port)])
        assert await resolver.resolve("both.test", 443) == ["127.0.0.1", "::1"]
        assert await resolver.resolve("v6.test", 443) == ["::1"]
        assert await resolver.resolve("unknown.test", 443) == []
        names.set("both.test", ["127.0.0.1"])
        assert await resolver.resolve("both.test", 443) == ["127.0.0.1"]
        assert names.lookups("both.test", "A") == names.lookups("both.test", "AAAA") == 2


@pytest_twisted.ensureDeferred
async def test_dns_server_that_never_answers_fails_the_lookup() -> None:
    """No answer within the retries: the lookup fails (the policy's 502), in
    about the resolver's timeouts (here 0.1 + 0.2 s)."""
    import socket
    import time

    from twisted.internet import reactor
    from twisted.internet.defer import TimeoutError as QueryTimeout

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = DnsServerResolver(reactor, [silent.getsockname()], timeout=(0.1, 0.2))
        start = time.monotonic()
        with pytest.raises(QueryTimeout):
            await resolver.resolve("any.test", 443)
        assert time.monotonic() - start < 2
    finally:
        silent.close()
