"""Leases on a shared auto-started proxy, kept as files under C{$LLMOBSERVE_HOME}.

The rule (documented in docs/SDK.md): every process that uses an
auto-started proxy holds a lease, a file named after its pid in
C{proxy-<port>/clients/}. The supervisor that started the proxy stops it
once no lease belongs to a live process for C{LLMOBSERVE_PROXY_LINGER}
seconds. Both sides take the same C{flock} for "check, then start" and
"check, then stop", so a process that arrives while the proxy is being
stopped waits and starts a new one instead of finding it gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]  # checked before use

__all__ = ["ProxyHome", "home_dir", "process_start_time"]


def home_dir() -> Path:
    """C{$LLMOBSERVE_HOME}, by default C{~/.llmobserve}."""
    return Path(os.environ.get("LLMOBSERVE_HOME") or Path.home() / ".llmobserve")


def process_start_time(pid: int) -> str:
    """An opaque start stamp for C{pid} ("" if unknown), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # Field 22 (starttime) counts from after the ")" closing the command name.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _alive(pid: int, stamp: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not stamp or process_start_time(pid) in ("", stamp)


class ProxyHome:
    """The state directory of the auto-started proxy on one port."""

    def __init__(self, port: int, home: Path | None = None) -> None:
        self.port = port
        self.root = (home or home_dir()) / f"proxy-{port}"
        self.clients = self.root / "clients"
        self.log_path = self.root / "proxy.log"
        self.supervisor_pid = self.root / "supervisor.pid"
        self.proxy_pid = self.root / "proxy.pid"
        self.config_path = self.root / "proxy-config.json"

    def prepare(self) -> None:
        """Create the directories (private to the user)."""
        self.clients.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the start/stop lock of this proxy (blocking)."""
        self.prepare()
        with open(self.root / "lock", "a+") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def take_lease(self, pid: int | None = None) -> Path:
        """Record that process C{pid} (default: this one) uses the proxy."""
        pid = os.getpid() if pid is None else pid
        self.prepare()
        path = self.clients / str(pid)
        path.write_text(process_start_time(pid))
        return path

    def drop_lease(self, pid: int | None = None) -> None:
        """Withdraw the lease of C{pid} (default: this process)."""
        with contextlib.suppress(FileNotFoundError):
            (self.clients / str(os.getpid() if pid is None else pid)).unlink()

    def live_leases(self) -> list[int]:
        """Pids holding a lease that are still running; stale lease files are removed."""
        live = []
        try:
            entries = list(self.clients.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                pid = int(entry.name)
                stamp = entry.read_text()
            except (ValueError, OSError):
                continue
            if _alive(pid, stamp):
                live.append(pid)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        return live

    def read_pid(self, path: Path) -> int | None:
        """A pid file's content, or C{None}."""
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
