"""Shared fixtures: real proxy/collector processes and fake loopback upstreams.

Every fixture here tears down what it started, also when the test fails;
processes are additionally killed by the kernel if the test run itself dies
(see L{support.proxy}).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.proxy import CollectorProcess, ProxyProcess
from support.upstreams import (
    BigBodyUpstream,
    RawScriptUpstream,
    RecordingUpstream,
    SSEUpstream,
    closed_port,
)

# Keep every HTTP client in the test process off any configured proxy.
for _name in ("http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"


ProxyFactory = Callable[..., ProxyProcess]
CollectorFactory = Callable[..., CollectorProcess]


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """
    C{proxy_factory(*args, env=None, start_timeout=15.0) -> ProxyProcess}:
    start C{twistd -n llmobserve --port tcp:0:interface=127.0.0.1 *args}
    in a fresh directory under C{tmp_path} and wait until it listens.  Every
    process started is terminated (SIGTERM, then SIGKILL after 5 s) at
    teardown, pass or fail; on teardown of a failed test the log tail is in
    the report via C{proxy.log_text()}.
    """
    started: list[ProxyProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, start_timeout: float = 15.0
    ) -> ProxyProcess:
        workdir = tmp_path / f"proxy{len(started)}"
        proc = ProxyProcess(args, workdir=workdir, env=env, start_timeout=start_timeout)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.terminate(5.0)


@pytest.fixture
def collector_factory(tmp_path: Path) -> Iterator[CollectorFactory]:
    """
    C{collector_factory(*args, db=None, env=None) -> CollectorProcess}: start
    C{twistd -n llmobserve-collector --port tcp:0:... --db PATH *args};
    always torn down.
    """
    started: list[CollectorProcess] = []

    def start(
        *args: str,
        db: Path | str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> CollectorProcess:
        workdir = tmp_path / f"collector{len(started)}"
        proc = CollectorProcess(args, db=db, workdir=workdir, env=env, start_timeout=start_timeout)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.terminate(5.0)


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., Any]]:
    """
    C{upstream_factory(cls, *args, **kwargs)}: start any fake upstream class
    from L{support.upstreams} with custom arguments; closed at teardown.
    """
    servers: list[Any] = []

    def start(cls: type[Any], *args: Any, **kwargs: Any) -> Any:
        server = cls(*args, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.close()


@pytest.fixture
def recording_upstream() -> Iterator[RecordingUpstream]:
    """A started L{RecordingUpstream} answering an OpenAI-like JSON 200."""
    with RecordingUpstream() as server:
        yield server


@pytest.fixture
def sse_upstream() -> Iterator[SSEUpstream]:
    """A started L{SSEUpstream}: 5 deltas, 50 ms apart (set attributes to change)."""
    with SSEUpstream() as server:
        yield server


@pytest.fixture
def big_body_upstream() -> Iterator[BigBodyUpstream]:
    """A started L{BigBodyUpstream} (100 MiB downloads by default; uploads hashed)."""
    with BigBodyUpstream() as server:
        yield server


@pytest.fixture
def raw_upstream() -> Iterator[RawScriptUpstream]:
    """A started L{RawScriptUpstream}; set C{.script} / C{.scripts} before use."""
    with RawScriptUpstream() as server:
        yield server


@pytest.fixture
def down_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return closed_port()


@pytest.fixture(autouse=True)
def _records_built_as_their_constructor_builds_them(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the parser tests (tests/parsers/), every UsageRecord that analyse()
    builds through construct() is checked against the dataclass's own
    constructor: all fields named, same object.  It lives here because
    tests/parsers/ is a top-level import root (pyproject.toml's pythonpath and
    mypy_path), where a conftest.py of its own would clash with this one."""
    if request.path.parent.name != "parsers":
        return
    from parsers_testkit import checking_construct

    from parsers import _analyse, _records

    monkeypatch.setattr(_analyse, "construct", checking_construct(_records.construct))


@pytest.fixture(autouse=True, scope="session")
def _illegal_state_transitions_raise() -> Iterator[None]:
    """A state machine's illegal move (llmobserve.proxy._states) raises in every
    test, in process and in the proxies the tests start (they inherit the
    environment); production only logs it."""
    from llmobserve.proxy import _states

    os.environ["LLMOBSERVE_STRICT_STATES"] = "1"
    saved, _states.strict = _states.strict, True
    yield
    _states.strict = saved


# -- PostgreSQL ---------------------------------------------------------------

_PG_SKIPPED: list[str] = []


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL server for the whole run (L{support.postgres}).

    Without server binaries the test skips, said loudly at the end of the
    run; under C{CI=true} that is a failure (.ci/run installs them).
    """
    from support.postgres import PostgresServer, find_binaries

    bindir = find_binaries()
    if bindir is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        _PG_SKIPPED.append(reason)
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    server = PostgresServer(bindir)
    try:
        server.init().start()
    except Exception:
        server.destroy()
        raise
    yield server
    server.destroy()


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    """A connection URL to an empty schema of its own on L{postgres_server}."""
    url: str = postgres_server.fresh_schema()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def shared_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store several collectors share: a PostgreSQL database (L{pg_url}),
    or one SQLite file (collectors on one machine; docs/COLLECTOR.md)."""
    if request.param == "sqlite":
        return str(tmp_path / "shared.sqlite3")
    url: str = request.getfixturevalue("pg_url")
    return url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly that the PostgreSQL back end went untested."""
    if _PG_SKIPPED:
        terminalreporter.write_sep("!", "PostgreSQL TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(
            f"{_PG_SKIPPED[0]}; every PostgreSQL test was skipped (CI=true makes this a failure)"
        )
