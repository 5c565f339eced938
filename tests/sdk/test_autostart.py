"""Auto-start, reuse and the shared proxy's lifetime, with real processes.

Every test uses its own port (C{LLMOBSERVE_PROXY_PORT}), its own
C{LLMOBSERVE_HOME} and a short C{LLMOBSERVE_PROXY_LINGER}, and the fixture
kills whatever supervisor/proxy the pid files name at teardown, then checks
that nothing was left to kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.upstreams import RecordingUpstream, closed_port

import llmobserve
from llmobserve.sdk._autostart import health
from llmobserve.sdk._leases import ProxyHome

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

APP = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
import httpx, llmobserve
obs = llmobserve.observe(provider_hosts={{"{up}": "openai"}})
with llmobserve.customer(sys.argv[1]), llmobserve.section("auto"):
    r = httpx.post("http://{up}/v1/chat/completions", content=b'{{"model":"gpt-4o-mini"}}')
print(json.dumps({{"tracking": obs.tracking, "url": obs.proxy_url,
                  "started": obs.started_proxy, "status": r.status_code}}), flush=True)
sys.stdin.readline()  # stay alive until the test says so
"""


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


class Machine:
    """One port and one home: what processes on "the machine" share."""

    def __init__(self, tmp: Path) -> None:
        self.port = closed_port()
        self.home = tmp / "home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOBSERVE_")}
        self.env.update(
            LLMOBSERVE_HOME=str(self.home),
            LLMOBSERVE_PROXY_PORT=str(self.port),
            LLMOBSERVE_PROXY_LINGER="1",
            PYTHONPATH=str(ROOT),
        )
        self.state = ProxyHome(self.port, self.home)
        self.apps: list[subprocess.Popen[str]] = []

    def app(
        self, upstream: RecordingUpstream, customer: str
    ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        code = textwrap.dedent(APP.format(up=upstream.authority))
        proc = subprocess.Popen(
            [sys.executable, "-c", code, customer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd="/",
        )
        self.apps.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(proc.stderr.read() if proc.stderr else "no output")
        return proc, json.loads(line)

    def finish(self, proc: subprocess.Popen[str]) -> str:
        _, err = proc.communicate("\n", timeout=20)
        assert proc.returncode == 0, err
        return err

    def pids(self) -> tuple[int | None, int | None]:
        return (
            self.state.read_pid(self.state.supervisor_pid),
            self.state.read_pid(self.state.proxy_pid),
        )

    def wait_stopped(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if health("127.0.0.1", self.port) is None and not any(map(_alive, self.pids())):
                return True
            time.sleep(0.1)
        return False

    def kill_everything(self) -> list[int]:
        killed = []
        for proc in self.apps:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.pids():
            if _alive(pid):
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    m = Machine(tmp_path)
    yield m
    leftovers = m.kill_everything()
    assert m.wait_stopped(10), "the proxy still answers after teardown"
    assert leftovers == [], f"processes outlived the test: {leftovers}"


def _events(home: Path, customer: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    from llmobserve.collector._store import EventStore

    db = home / "events.sqlite3"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            found = EventStore(db).events(limit=None, customer=customer, kind="call")
            if found:
                return found
        time.sleep(0.1)
    return []


def test_auto_start_reuse_and_stop_when_unused(machine: Machine) -> None:
    """The first process starts the proxy, the second reuses it; it outlives the first,
    and stops (no orphan) once the last one is gone for the linger time."""
    with RecordingUpstream() as up:
        first, seen1 = machine.app(up, "first")
        assert seen1 == {
            "tracking": True,
            "url": f"http://127.0.0.1:{machine.port}",
            "started": True,
            "status": 200,
        }
        supervisor, proxy = machine.pids()
        assert _alive(supervisor) and _alive(proxy)
        assert health("127.0.0.1", machine.port)

        second, seen2 = machine.app(up, "second")
        assert seen2["tracking"] is True and seen2["started"] is False
        assert machine.pids() == (supervisor, proxy)

        err = machine.finish(first)
        assert f"proxy at http://127.0.0.1:{machine.port} (started)" in err
        time.sleep(2.0)  # longer than the linger: the second process still holds a lease
        assert health("127.0.0.1", machine.port), "stopped while still in use"

        err2 = machine.finish(second)
        assert "(already running)" in err2
        assert machine.wait_stopped(), "the proxy outlived its last user"

    # Both calls were tracked, in the embedded store under LLMOBSERVE_HOME.
    for customer in ("first", "second"):
        [event] = _events(machine.home, customer)
        assert event["provider"] == "openai"
        assert event["usage"]["input_tokens"] == 9
        assert event["context"]["section_path"] == "auto"


def test_a_crashed_user_does_not_keep_the_proxy_alive(machine: Machine) -> None:
    """A process killed with SIGKILL leaves a stale lease; the supervisor notices."""
    with RecordingUpstream() as up:
        app, seen = machine.app(up, "crash")
        assert seen["started"] is True
        app.kill()
        app.wait()
        assert machine.wait_stopped()


def test_foreign_service_on_the_port_is_not_reused(
    machine: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else answers on the port: no routing, a warning, nothing started."""
    with RecordingUpstream() as foreign:
        port = int(foreign.authority.rsplit(":", 1)[1])
        with caplog.at_level("WARNING", logger="llmobserve"):
            obs = llmobserve.observe(proxy_port=port)
        assert obs.tracking is False
        assert "something other than an llmobserve proxy" in (obs.reason or "")
        assert any("NOT tracked" in r.getMessage() for r in caplog.records)
        assert [r.path for r in foreign.requests] == ["/health"]
    assert not ProxyHome(port).supervisor_pid.exists()


def test_auto_start_in_process_then_shutdown(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """observe() with no proxy_url in this very process: started on the test's port;
    shutdown() gives up the lease and the proxy goes away."""
    monkeypatch.setenv("LLMOBSERVE_HOME", str(machine.home))
    monkeypatch.setenv("LLMOBSERVE_PROXY_LINGER", "0.5")
    obs = llmobserve.observe(proxy_port=machine.port)
    assert obs.tracking is True and obs.started_proxy is True
    assert obs.proxy_url == f"http://127.0.0.1:{machine.port}"
    llmobserve.shutdown()
    assert machine.wait_stopped()


def test_auto_start_inside_an_event_loop_does_not_block_it(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called from a running loop, observe() returns at once and finds the proxy in a thread."""
    import asyncio

    monkeypatch.setenv("LLMOBSERVE_HOME", str(machine.home))
    monkeypatch.setenv("LLMOBSERVE_PROXY_LINGER", "0.5")

    async def main() -> Any:
        pending = llmobserve.observe(proxy_port=machine.port)
        # it came back before any proxy was found or started: the finding is left to a thread
        assert pending.tracking is None
        return await asyncio.to_thread(pending.wait, 30)

    final = asyncio.run(main())
    assert final.tracking is True and final.proxy_url == f"http://127.0.0.1:{machine.port}"
    llmobserve.shutdown()
    assert machine.wait_stopped()


#: A short script with the real openai client, as in issue 14: observe(), one call, exit.
SCRIPT = """
import json, sys
import llmobserve
hosts = json.loads(sys.argv[2])
obs = llmobserve.observe(**({{"provider_hosts": hosts}} if hosts else {{}}))
from openai import OpenAI
client = OpenAI(api_key="sk-test", base_url="http://{up}/v1", max_retries=0)
with llmobserve.customer(sys.argv[1]):
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hi"}}]
    )
print(json.dumps({{"tracking": obs.tracking, "started": obs.started_proxy, "model": r.model}}))
"""


def _script(machine: Machine, up: RecordingUpstream, customer: str, hosts: dict[str, str]) -> Any:
    code = textwrap.dedent(SCRIPT.format(up=up.authority))
    return subprocess.run(
        [sys.executable, "-c", code, customer, json.dumps(hosts)],
        capture_output=True,
        text=True,
        env=machine.env,
        cwd="/",
        timeout=60,
        check=True,
    )


def test_a_lingering_proxy_learns_the_provider_hosts_of_a_new_observe(machine: Machine) -> None:
    """Issue 14, items 1 and 2, as the newcomer met them. A script calls a local
    OpenAI-compatible server without provider_hosts: the call goes direct and stderr
    says it is not tracked and how to fix it. The next script names the host while the
    first one's proxy still lingers: the SDK restarts the proxy it started with that
    host added, and the call is tracked (no 403, nothing sent direct)."""
    machine.env["LLMOBSERVE_PROXY_LINGER"] = "8"
    with RecordingUpstream() as up:
        first = _script(machine, up, "first", {})
        assert json.loads(first.stdout)["started"] is True
        assert (
            f"calls to {up.authority} are not tracked (loopback); "
            f'pass provider_hosts={{"{up.authority}": "<provider>"}} to track them'
        ) in first.stderr
        [direct] = up.wait_requests(1)
        assert direct.header("Via") is None
        supervisor, _ = machine.pids()
        assert _alive(supervisor) and health("127.0.0.1", machine.port)  # lingering

        second = _script(machine, up, "second", {up.authority: "openai"})
        seen = json.loads(second.stdout)
        assert seen["tracking"] is True and seen["model"] == "gpt-4o-mini-2024-07-18"
        assert f"(restarted to add provider_hosts {up.authority})" in second.stderr
        assert "NOT tracked" not in second.stderr and "not tracked" not in second.stderr
        assert machine.pids()[0] != supervisor
        _, routed = up.wait_requests(2)
        assert routed.header("Via") == b"1.1 llmobserve"
        [event] = _events(machine.home, "second")
        assert event["provider"] == "openai" and event["outcome"] == "ok"
        assert event["usage"]["input_tokens"] == 9
        assert _events(machine.home, "first", timeout=0.5) == []
    assert machine.wait_stopped(40), "the restarted proxy outlived its last user"
