"""Run C{twistd -n llmobserve} and C{twistd -n llmobserve-collector} as real subprocesses.

Each process gets its own temporary working directory and C{LLMOBSERVE_HOME},
listens on an ephemeral 127.0.0.1 port, and has its stdout and stderr captured
to a log file.  The port is read from the start-up line the service logs once
it is bound.  The child is started through a tiny shim that asks the kernel to
SIGKILL it when the thread that started it dies, so a crashed or killed test
run never leaves a proxy behind.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

__all__ = [
    "LOOPBACK_ARGS",
    "CollectorProcess",
    "ProcessStartError",
    "ProxyProcess",
    "RSSSampler",
    "TwistdProcess",
    "loopback_env",
]

# Run in the child before twistd: PR_SET_PDEATHSIG(SIGKILL), then exec.  If the
# parent already died between fork and prctl, exit at once.
_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ppid = int(sys.argv[1])\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != ppid:\n"
    "    os._exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)

#: Options that admit loopback upstreams and scale the timeouts down so
#: failure cases finish fast (for fake upstreams on 127.0.0.1).
LOOPBACK_ARGS: tuple[str, ...] = (
    "--allow-cidr",
    "127.0.0.1/32",
    "--connect-timeout",
    "2",
    "--header-timeout",
    "5",
    "--idle-timeout",
    "5",
)

# twistd itself (C{python -m twisted} is the newer C{twist} runner, which has
# no -n/--pidfile and no pid file or daemon handling).
_TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"
)

_LISTENING = r"listening on (https?)://(\[[^\]]+\]|[^\s:/\]]+):(\d+)"

_PROXY_ENV_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)

_live: weakref.WeakSet[TwistdProcess] = weakref.WeakSet()


def _kill_leftovers() -> None:
    for proc in list(_live):
        proc.kill()


atexit.register(_kill_leftovers)


def loopback_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    Return a copy of C{base} (default: C{os.environ}) that keeps HTTP clients
    off any configured proxy for loopback traffic.
    """
    env = dict(os.environ if base is None else base)
    for name in _PROXY_ENV_VARS:
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


class ProcessStartError(RuntimeError):
    """The service did not log its listening line in time (the message has the log tail)."""


class TwistdProcess:
    """
    One C{twistd -n PLUGIN} subprocess on an ephemeral loopback port.

    Use as a context manager, or call L{start} and L{terminate} yourself.
    Must be started from a thread that outlives it (normally the main
    thread): the child is killed when the starting thread exits.
    """

    plugin: ClassVar[str] = ""
    banner: ClassVar[str] = ""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: str = "tcp:0:interface=127.0.0.1",
        workdir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        """
        @param args: extra command-line options after C{--port}.
        @param port: the Twisted endpoint description to listen on.
        @param workdir: directory for the log, home and cwd; a fresh temporary
            directory (removed on L{terminate}) when omitted.
        @param env: extra environment variables (on top of a proxy-free copy
            of C{os.environ}).
        @param start_timeout: seconds to wait for the listening line.
        """
        self.args = list(args)
        self.port_spec = port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llmo-proc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "home"
        self.home.mkdir(exist_ok=True)
        self.log_path = self.workdir / f"{self.plugin}.log"
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.scheme = "http"
        self.host = ""
        self.port = 0
        self.started_at = 0.0
        self._log_start = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- life cycle ---------------------------------------------------------

    def command(self) -> list[str]:
        """The twistd command line (without the deathsig shim)."""
        return [
            sys.executable,
            "-c",
            _TWISTD,
            "--pidfile=",
            "-n",
            self.plugin,
            "--port",
            self.port_spec,
            *self.args,
        ]

    def environment(self) -> dict[str, str]:
        env = loopback_env()
        env["LLMOBSERVE_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        """Start the process and wait for its listening line."""
        if self._popen is not None:
            raise RuntimeError("already started")
        cmd = [sys.executable, "-c", _SHIM, str(os.getpid()), *self.command()[1:]]
        log = open(self.log_path, "ab")  # closed in _reap
        # a process restarted in the same workdir appends to the same file:
        # its own log (and listening line) starts here
        self._log_start = log.tell()
        self._log_file = log
        self.started_at = time.monotonic()
        self._popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.environment(),
            start_new_session=True,
        )
        _live.add(self)
        try:
            self._wait_listening()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_listening(self) -> None:
        pattern = re.compile(re.escape(self.banner) + " " + _LISTENING)
        deadline = time.monotonic() + self.start_timeout
        delay = 0.01
        while True:
            match = pattern.search(self.log_text())
            if match:
                self.scheme = match.group(1)
                self.host = match.group(2).strip("[]")
                self.port = int(match.group(3))
                return
            code = self.poll()
            if code is not None:
                raise ProcessStartError(
                    f"{self.plugin} exited with {code} before listening;\n"
                    f"command: {self.command()}\nlog tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{self.plugin} did not log {self.banner!r} within "
                    f"{self.start_timeout}s;\ncommand: {self.command()}\n"
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def poll(self) -> int | None:
        """The exit code, or C{None} while running."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """
        SIGTERM, wait up to C{timeout} seconds, then SIGKILL the whole
        process group.  Returns the exit code (negative: killed by signal).
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            try:
                popen.send_signal(signal.SIGTERM)
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the process group at once."""
        if self._popen is None:
            return None
        self._kill_group()
        return self._reap()

    def send_signal(self, sig: int) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; raises TimeoutExpired."""
        assert self._popen is not None
        return self._popen.wait(timeout)

    def _kill_group(self) -> None:
        assert self._popen is not None
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self) -> int | None:
        assert self._popen is not None
        try:
            code = self._popen.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        log = self._log_file
        if log is not None:
            log.close()
            self._log_file = None
        _live.discard(self)
        return code

    def cleanup(self) -> None:
        """Remove the temporary working directory (if we made it)."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate(5.0)

    # -- what tests look at ---------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._popen is not None, "not started"
        return self._popen.pid

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT} (no trailing slash; https for a TLS port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log_text(self) -> str:
        """What this process has logged (not an earlier one in the same workdir)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _status_field(self, name: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise LookupError(name)

    def rss_kib(self) -> int:
        """Current resident set size (VmRSS) in KiB."""
        return self._status_field("VmRSS")

    def peak_rss_kib(self) -> int:
        """Peak resident set size (VmHWM) in KiB."""
        return self._status_field("VmHWM")

    def fd_count(self) -> int:
        """Number of open file descriptors."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is state (field 3); utime and stime are fields 14 and 15.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def set_affinity(self, cpus: set[int]) -> None:
        """Pin every thread of the process (affinity is per thread)."""
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass

    def thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))


class ProxyProcess(TwistdProcess):
    """C{twistd -n llmobserve --port tcp:0:interface=127.0.0.1 ARGS...}."""

    plugin = "llmobserve"
    banner = "llmobserve proxy"

    def proxy_url(self, path: str = "/proxy") -> str:
        return self.url + path


class CollectorProcess(TwistdProcess):
    """
    C{twistd -n llmobserve-collector --port tcp:0:interface=127.0.0.1 --db PATH ARGS...}.

    C{db} defaults to C{collector.db} in the working directory; a
    C{postgresql://} URL is passed as it is.
    """

    plugin = "llmobserve-collector"
    banner = "llmobserve collector"

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        db: Path | str | None = None,
        port: str = "tcp:0:interface=127.0.0.1",
        workdir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(args, port=port, workdir=workdir, env=env, start_timeout=start_timeout)
        self.db: Path | str = self.workdir / "collector.db" if db is None else db
        if not (isinstance(self.db, str) and "://" in self.db):
            self.db = Path(self.db)

    def command(self) -> list[str]:
        return [*super().command(), "--db", str(self.db)]


class RSSSampler:
    """
    Samples a process's RSS (KiB) in a background thread every C{interval}
    seconds while in the C{with} block.  C{baseline} is the first sample,
    C{peak} the largest, C{growth_kib} their difference.
    """

    def __init__(self, proc: TwistdProcess, interval: float = 0.02) -> None:
        self.proc = proc
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        try:
            self.samples.append((time.monotonic(), self.proc.rss_kib()))
        except (OSError, LookupError):
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sample()

    @property
    def baseline(self) -> int:
        return self.samples[0][1]

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline
