"""A real PostgreSQL server for the tests, started in a temporary directory.

L{PostgresServer} runs Debian's (or any) C{initdb} and C{pg_ctl} on a free
loopback port with a unix socket in its own directory, trust auth for one
user, and stops and deletes everything on L{PostgresServer.stop}. initdb
refuses to run as root: as root the directory is given to the C{postgres}
user and the commands run as that user (C{runuser -u postgres --}).

L{find_binaries} looks on C{PATH}, then in C{/usr/lib/postgresql/*/bin}
(the newest first); C{None} when there is no server here: the tests then
skip loudly, or fail under C{CI=true} (tests/conftest.py).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "llmobserve"


def find_binaries() -> Path | None:
    """The directory holding C{initdb}, C{pg_ctl} and C{postgres}, if any."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
        reverse=True,
    )
    for directory in candidates:
        if all((Path(directory) / n).exists() for n in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One throwaway PostgreSQL server on 127.0.0.1.

    @param bindir: from L{find_binaries}.
    @param fsync: PostgreSQL's C{fsync} (off for tests: nothing here
        outlives a power loss; on for benchmarks).
    """

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="llmobserve-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            # initdb will not run as root: the postgres user owns the directory
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and no 'postgres' user to run initdb") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n"
                f"{self.log_text()}"
            )

    def init(self) -> PostgresServer:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        return self

    def start(self, port: int | None = None) -> PostgresServer:
        """Start (or start again, on the same port by default) and wait until ready."""
        self.port = port or self.port or free_port()
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync={'on' if self.fsync else 'off'} "
            "-c synchronous_commit=on -c max_connections=50 -c shared_buffers=64MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            "60",
            "start",
            timeout=90.0,
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (C{fast}: clients are cut off at once; C{immediate}: a crash)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres", schema: str | None = None) -> str:
        """A connection URL; with C{schema}, the search path is that schema only."""
        url = f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"
        if schema is not None:
            url += f"?options=-csearch_path%3D{schema}"
        return url

    def fresh_schema(self) -> str:
        """A URL whose tables live in a new, empty schema of their own."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return self.url(schema=name)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop if running and delete the directory."""
        try:
            self.stop("immediate")
        except Exception:  # already stopped, or never started
            pass
        shutil.rmtree(self.root, ignore_errors=True)
