"""What a user sees when C{twistd llmobserve} or C{llmobserve-collector} cannot
start, with real processes (issue 14, items 4 and 8).

A taken port used to leave the process running forever after a traceback
(the proxy) or exit 0 (the collector); a mistyped option printed 67 lines
of help before the error. Now: one line and exit 1 for a port that cannot
be had, two lines on stderr and exit 2 for a usage error.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.proxy import (
    CollectorProcess,
    ProcessStartError,
    ProxyProcess,
    TwistdProcess,
)

KINDS = [ProxyProcess, CollectorProcess]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS, ids=["proxy", "collector"])
def test_a_taken_port_exits_1_with_one_line(
    kind: type[TwistdProcess], taken_port: int, tmp_path: Path
) -> None:
    """Port taken: one critical line naming the address and the reason, no
    traceback, and the process ends with status 1 (it served nothing)."""
    proc = kind(port=f"tcp:{taken_port}:interface=127.0.0.1", workdir=tmp_path, start_timeout=20)
    with pytest.raises(ProcessStartError, match="exited with 1 before listening"):
        proc.start()
    log = proc.log_text()
    said = [line for line in log.splitlines() if "cannot listen" in line]
    assert len(said) == 1, log
    assert said[0].endswith(
        f"cannot listen on 127.0.0.1:{taken_port}: address already in use; stopping"
    )
    assert "Traceback" not in log and "Unhandled error" not in log


def _run(proc: TwistdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = proc.command()
    at = command.index("--port")
    command[at:] = list(args)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=proc.environment(),
        cwd=proc.workdir,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("kind", "name"),
    [(ProxyProcess, "llmobserve"), (CollectorProcess, "llmobserve-collector")],
    ids=["proxy", "collector"],
)
def test_a_mistyped_option_is_two_lines_error_first(
    kind: type[TwistdProcess], name: str, tmp_path: Path
) -> None:
    """--prot 9001: the error, then a one-line hint to --help, on stderr; exit 2;
    no help text."""
    out = _run(kind(workdir=tmp_path), "--prot", "9001")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"twistd {name}: option --prot not recognized",
        f"Run 'twistd {name} --help' for every option.",
    ]
    assert out.stdout == ""


@pytest.mark.parametrize("kind", KINDS, ids=["proxy", "collector"])
def test_a_port_out_of_range_is_a_usage_error(kind: type[TwistdProcess], tmp_path: Path) -> None:
    """--port 99999 used to reach listen() (OverflowError, 'Unhandled error in
    Deferred', still running); it is refused before anything starts."""
    out = _run(kind(workdir=tmp_path), "--port", "99999")
    assert out.returncode == 2
    assert "--port: port must be a number from 0 to 65535, got '99999'" in out.stderr
    assert len(out.stderr.splitlines()) == 2


class _AsDocumented:
    """The README's commands as written: no C{--pidfile=}."""

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "--pidfile="]  # type: ignore[misc]  # the base class types command() more narrowly


class _DocumentedCollector(_AsDocumented, CollectorProcess):
    pass


class _DocumentedProxy(_AsDocumented, ProxyProcess):
    pass


def test_the_collector_recipe_runs_from_one_directory(tmp_path: Path) -> None:
    """Issue 14 item 5: README's 'twistd -n llmobserve-collector ...' then 'twistd -n
    llmobserve --collector ...' from one directory: the second used to stop with
    'Another twistd server is running' (twistd.pid). In the foreground no pid file
    is written, so both run, and the proxy's link to the collector comes up."""
    import json
    import time
    import urllib.request

    with _DocumentedCollector(workdir=tmp_path) as collector:
        with _DocumentedProxy(["--collector", collector.url], workdir=tmp_path) as proxy:
            assert not (tmp_path / "twistd.pid").exists()
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(proxy.url + "/health", timeout=5) as r:
                    link = json.loads(r.read())["collector"]
                if link["state"] == "connected" or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            # (the link's other fields, e.g. "refused", are not this test's business)
            assert {k: link.get(k) for k in ("mode", "state", "url")} == {
                "mode": "link",
                "state": "connected",
                "url": collector.url,
            }


def test_shutdown_says_what_the_proxy_recorded(tmp_path: Path) -> None:
    """Issue 14 item 15: on SIGTERM the proxy logs one line with its calls, their
    cost in fixed notation, the unpriced ones, and the events delivered and waiting."""
    import re

    from support.clients import chat_calls
    from support.proxy import LOOPBACK_ARGS
    from support.upstreams import RecordingUpstream

    with RecordingUpstream() as priced, RecordingUpstream() as unknown:
        provider = f"127.0.0.1:{priced.port}=openai"
        proxy = ProxyProcess([*LOOPBACK_ARGS, "--provider-host", provider], workdir=tmp_path)
        with proxy:
            chat_calls(proxy.port, f"http://127.0.0.1:{priced.port}", 2)
            chat_calls(proxy.port, f"http://127.0.0.1:{unknown.port}", 1)
        assert proxy.poll() == 0
    said = [line for line in proxy.log_text().splitlines() if "proxy stopped:" in line]
    assert len(said) == 1, proxy.log_tail()
    assert re.search(
        r"llmobserve proxy stopped: 3 calls, \$0\.0000\d+ priced, 1 unpriced; "
        r"events: 3 delivered to the embedded store, 0 waiting in the spool for the next start$",
        said[0],
    ), said[0]
