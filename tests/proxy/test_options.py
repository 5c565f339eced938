"""C{twistd llmobserve}'s command line: what the options become, and the
values refused before the proxy starts."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python import usage

from llmobserve.proxy._tap import Options


def parse(*argv: str) -> Any:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_a_bare_port_listens_on_loopback_with_a_deep_backlog() -> None:
    assert parse("--port", "9000")["port"] == "tcp:9000:interface=127.0.0.1:backlog=1024"
    assert parse()["port"] == "tcp:9000:interface=127.0.0.1:backlog=1024"


def test_dns_servers_in_the_order_given() -> None:
    options = parse("--dns-server", "127.0.0.1:5353", "--dns-server", "[::1]")
    assert options["dns-server"] == [("127.0.0.1", 5353), ("::1", 53)]
    assert parse()["dns-server"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--dns-server", "dns.example"), "--dns-server"),
        (("--dns-server", "127.0.0.1:99999"), "--dns-server"),
        (("--resolve", "a.test=not-an-ip"), "--resolve a.test"),
        (("--allow-cidr", "10.0.0.0/33"), "--allow-cidr"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


@pytest.mark.parametrize(
    ("port", "beyond"),
    [
        ("9000", False),
        ("tcp6:9000:interface=\\:\\:1", False),  # escaped colons: still loopback
        ("tcp:9000:interface=0.0.0.0", True),
        ("tcp:9000", True),
        ("unix:/tmp/llmo.sock", False),
    ],
)
def test_known_hosts_only_is_forced_beyond_loopback_only(port: str, beyond: bool) -> None:
    options = parse("--port", port)
    assert bool(options["known-hosts-only"]) is beyond
    assert bool(options["require-keys"]) is beyond  # clients need X-LLMObserve-Key


def test_there_is_one_http_front_end() -> None:
    """C{--server twisted-web} is gone: C{twistd llmobserve} always serves its
    own channel (request head and body deadlines); C{ProxySite} stays a
    library API."""
    with pytest.raises(usage.UsageError, match="server"):
        parse("--server", "twisted-web")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--base-url", "opneai=http://127.0.0.1:18080"),
            "--base-url: unknown provider 'opneai'; did you mean 'openai'",
        ),
        (
            ("--provider-host", "127.0.0.1:18080=antropic"),
            "--provider-host: unknown provider 'antropic'; did you mean 'anthropic'",
        ),
    ],
)
def test_a_misspelt_provider_id_is_refused_naming_the_closest(
    argv: tuple[str, ...], message: str
) -> None:
    """Issue 14 item 7: an unknown id used to be accepted and its calls recorded as unknown."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_known_provider_ids_are_accepted() -> None:
    options = parse(
        "--base-url", "openai=http://127.0.0.1:18080", "--provider-host", "10.0.0.5:8000=groq"
    )
    assert options["base-url"] == {"openai": "http://127.0.0.1:18080"}
    assert options["provider-host"] == {"10.0.0.5:8000": "groq"}


def test_a_malformed_base_url_is_a_usage_error() -> None:
    """The URL is checked when parsed (a bad one would otherwise fail later, in
    makeService, as a traceback), since its host is admitted like a provider host."""
    with pytest.raises(usage.UsageError, match="--base-url openai: "):
        parse("--base-url", "openai=http://user@127.0.0.1:18080")


@pytest.mark.parametrize(
    ("argv", "pidfile"),
    [
        (["-n", "llmobserve"], ""),
        (["-n", "--pidfile", "my.pid", "llmobserve"], "my.pid"),
        (["llmobserve"], "twistd.pid"),
    ],
)
def test_no_pid_file_in_the_foreground_unless_named(argv: list[str], pidfile: str) -> None:
    """Issue 14 item 5: twistd -n llmobserve writes no twistd.pid (two of the README's
    commands run from one directory); --pidfile and a daemon keep twistd's rule."""
    from pathlib import Path

    from twisted.scripts._twistd_unix import ServerOptions

    twistd = ServerOptions()
    twistd.parseOptions(argv)
    assert twistd["pidfile"] == (str(Path(pidfile).absolute()) if pidfile else "")
