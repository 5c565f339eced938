"""The C{--port} of the proxy and the collector as an endpoint string."""

from __future__ import annotations

import pytest

from llmobserve.endpoints import LISTEN_BACKLOG, check_port, endpoint_parts, listen_endpoint


def test_a_bare_port_is_loopback_with_a_deep_backlog() -> None:
    assert LISTEN_BACKLOG == 1024
    assert listen_endpoint("9000") == "tcp:9000:interface=127.0.0.1:backlog=1024"
    assert listen_endpoint(" 8000 ") == "tcp:8000:interface=127.0.0.1:backlog=1024"


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=1024"),
        ("tcp6:9000:interface=\\:\\:1", "tcp6:9000:interface=\\:\\:1:backlog=1024"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock:backlog=1024"),
    ],
)
def test_endpoint_strings_get_the_backlog_when_they_name_none(given: str, used: str) -> None:
    assert listen_endpoint(given) == used


@pytest.mark.parametrize(
    "given",
    [
        "tcp:9000:backlog=5:interface=127.0.0.1",
        "unix:/tmp/x.sock:backlog=7",
        "systemd:domain=INET:index=0",  # a kind without a backlog argument
    ],
)
def test_a_backlog_given_or_not_taken_is_left_alone(given: str) -> None:
    assert listen_endpoint(given) == given


def test_an_escaped_colon_is_not_an_argument() -> None:
    """C{unix:/tmp/a\\:backlog=1} names a path, not a backlog."""
    assert listen_endpoint("unix:/tmp/a\\:backlog=1") == "unix:/tmp/a\\:backlog=1:backlog=1024"


def test_endpoint_parts_split_at_unescaped_colons_only() -> None:
    assert endpoint_parts("tcp6:9000:interface=\\:\\:1") == ["tcp6", "9000", "interface=\\:\\:1"]
    assert endpoint_parts("unix:/tmp/x.sock") == ["unix", "/tmp/x.sock"]


@pytest.mark.parametrize(
    "description",
    ["tcp:99999:interface=127.0.0.1", "tcp6:port=70000", "ssl:-1", "tcp:http"],
)
def test_check_port_refuses_what_tcp_cannot_listen_on(description: str) -> None:
    with pytest.raises(ValueError, match="port must be a number from 0 to 65535"):
        check_port(description)


@pytest.mark.parametrize(
    "description", ["tcp:0:interface=127.0.0.1", "tcp6:port=65535", "unix:/tmp/x.sock"]
)
def test_check_port_accepts_valid_endpoints(description: str) -> None:
    check_port(description)
