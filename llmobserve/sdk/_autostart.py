"""Finding our proxy on 127.0.0.1, or starting the shared one.

C{ensure_proxy} takes a lease (see L{llmobserve.sdk._leases}), then under the
start lock reuses a proxy that answers C{/health} as ours, or starts the
supervisor (which runs C{twistd -n llmobserve}) and waits until the proxy is
healthy. Everything runs the installed package with C{sys.executable}.

A proxy the SDK started knows only the C{provider_hosts} it was started
with (they are its C{--provider-host} options, and its policy refuses
other local hosts). Its configuration is kept beside the pid files; when a
later C{observe()} names a host it does not know, the SDK restarts it with
the union of both (see docs/SDK.md, "The shared proxy").
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmobserve.sdk._leases import ProxyHome

__all__ = ["ProxyConfig", "ProxyFound", "ensure_proxy", "health", "release"]

log = logging.getLogger("llmobserve")

SERVICE = "llmobserve-proxy"
DEFAULT_PORT = 9000
DEFAULT_LINGER = 30.0


@dataclass(frozen=True, slots=True)
class ProxyFound:
    """A proxy the SDK can route through."""

    url: str
    started: bool  # this process started it (else: reused)
    health: Mapping[str, Any]
    restarted_for: tuple[str, ...] = ()  # provider hosts a running proxy was restarted to learn


def health(host: str, port: int, timeout: float = 0.5) -> Mapping[str, Any] | None:
    """C{/health} of whatever listens there: its JSON, C{{}} if not ours, C{None} if nothing."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(65536)
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        conn.close()
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if response.status != 200 or not isinstance(data, dict) or data.get("service") != SERVICE:
        return {}
    return data


def _proxy_args(collector_url: str | None, provider_hosts: Mapping[str, str]) -> list[str]:
    args = []
    if collector_url:
        args += ["--collector", collector_url]
    for host, provider in sorted(provider_hosts.items()):
        args += ["--provider-host", f"{host}={provider}"]
    return args


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What a started proxy was told: kept in C{proxy-config.json} while it runs."""

    collector_url: str | None
    provider_hosts: Mapping[str, str]

    def args(self) -> list[str]:
        """Its command-line options."""
        return _proxy_args(self.collector_url, self.provider_hosts)

    def missing(self, wanted: Mapping[str, str]) -> tuple[str, ...]:
        """The hosts of C{wanted} this proxy does not know (or knows as another provider)."""
        known = {_host_key(k): v for k, v in self.provider_hosts.items()}
        return tuple(sorted(k for k, v in wanted.items() if known.get(_host_key(k)) != v))

    def merged(self, wanted: Mapping[str, str]) -> ProxyConfig:
        """This configuration plus C{wanted}'s hosts (a new provider wins for a host)."""
        hosts = {_host_key(k): v for k, v in self.provider_hosts.items()}
        hosts.update({_host_key(k): v for k, v in wanted.items()})
        return ProxyConfig(self.collector_url, hosts)

    def save(self, state: ProxyHome) -> None:
        """Write it beside the pid files (the supervisor removes it when it stops)."""
        doc = {"collector_url": self.collector_url, "provider_hosts": dict(self.provider_hosts)}
        state.config_path.write_text(json.dumps(doc, sort_keys=True))

    @classmethod
    def load(cls, state: ProxyHome) -> ProxyConfig | None:
        """The saved configuration of the running proxy, or C{None} if unknown."""
        try:
            doc = json.loads(state.config_path.read_text())
            hosts = doc["provider_hosts"]
            collector = doc["collector_url"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(hosts, dict) or not (collector is None or isinstance(collector, str)):
            return None
        return cls(collector, {str(k): str(v) for k, v in hosts.items()})


def _host_key(spec: str) -> str:
    return spec.strip().lower()


def _start_supervisor(state: ProxyHome, args: list[str], api_key: str | None) -> None:
    """Start the supervisor, detached: it forks away, so it is never our child (no zombie)."""
    linger = os.environ.get("LLMOBSERVE_PROXY_LINGER") or str(DEFAULT_LINGER)
    env = dict(os.environ)
    if api_key:
        env["LLMOBSERVE_API_KEY"] = api_key  # never on a command line
        env["LLMOBSERVE_COLLECTOR_KEY"] = api_key  # the proxy's link key
    with open(state.log_path, "ab") as logfile:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmobserve.sdk._supervisor",
                "--detach",
                "--port",
                str(state.port),
                "--home",
                str(state.root.parent),
                "--linger",
                linger,
                "--",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=str(state.root),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        proc.wait()


_leased: ProxyHome | None = None


def _drop_lease_at_exit() -> None:
    if _leased is not None:
        _leased.drop_lease()


def _lease_in_child() -> None:
    if _leased is not None:
        try:
            _leased.take_lease()
        except OSError:
            pass


atexit.register(_drop_lease_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_lease_in_child)


def release() -> None:
    """Give up this process's lease (the proxy may then stop after its linger time)."""
    global _leased
    if _leased is not None:
        _leased.drop_lease()
        _leased = None


def ensure_proxy(
    port: int,
    *,
    collector_url: str | None,
    provider_hosts: Mapping[str, str],
    api_key: str | None,
    timeout: float,
) -> ProxyFound | str:
    """Reuse or start the shared proxy on C{127.0.0.1:port}; a reason string on failure."""
    global _leased
    state = ProxyHome(port)
    wanted = ProxyConfig(collector_url, dict(provider_hosts))
    url = f"http://127.0.0.1:{port}"
    with state.locked():
        state.take_lease()
        _leased = state
        found = health("127.0.0.1", port)
        restarted_for: tuple[str, ...] = ()
        if found:
            running = _supervised_config(state, collector_url)
            missing = running.missing(provider_hosts) if running is not None else ()
            if not missing:
                return ProxyFound(url, started=False, health=found)
            # Ours, started without some of these hosts: its policy would refuse them.
            if not _stop_and_wait(state, port, timeout):
                release()
                return (
                    f"the running proxy does not know {', '.join(missing)} and did not "
                    f"stop within {timeout:g}s to learn it (see {state.log_path})"
                )
            wanted = running.merged(provider_hosts) if running is not None else wanted
            restarted_for = missing
        elif found is not None:
            release()
            return f"something other than an llmobserve proxy answers on 127.0.0.1:{port}"
        with contextlib.suppress(FileNotFoundError):
            state.supervisor_pid.unlink()
        wanted.save(state)
        _start_supervisor(state, wanted.args(), api_key)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            found = health("127.0.0.1", port)
            if found:
                return ProxyFound(url, started=True, health=found, restarted_for=restarted_for)
            pid = state.read_pid(state.supervisor_pid)
            if pid is not None and not _running(pid):
                break
        _stop_supervisor(state)
        release()
        return f"the proxy did not become healthy within {timeout:g}s (see {state.log_path})"


def _supervised_config(state: ProxyHome, collector_url: str | None) -> ProxyConfig | None:
    """The configuration of the running proxy if the SDK started it (a live
    supervisor), else C{None}: a proxy started by hand is never restarted.
    Unknown (no file) reads as "no provider hosts"."""
    pid = state.read_pid(state.supervisor_pid)
    if pid is None or not _running(pid):
        return None
    return ProxyConfig.load(state) or ProxyConfig(collector_url, {})


def _stop_and_wait(state: ProxyHome, port: int, timeout: float) -> bool:
    """Stop the supervised proxy (it drains) and wait until the port is free."""
    pid = state.read_pid(state.supervisor_pid)
    _stop_supervisor(state)
    deadline = time.monotonic() + max(timeout, 20.0)  # a drain may take up to 15 s
    while time.monotonic() < deadline:
        if (pid is None or not _running(pid)) and health("127.0.0.1", port) is None:
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_supervisor(state: ProxyHome) -> None:
    """SIGTERM a supervisor whose proxy never became healthy (it stops the proxy too)."""
    pid = state.read_pid(state.supervisor_pid)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
