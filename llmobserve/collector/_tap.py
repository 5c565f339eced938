"""C{twistd llmobserve-collector}: options and C{makeService}."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from llmobserve._exit import stop_with_status
from llmobserve._tlsport import TLSHintReactor
from llmobserve._twistd import brief_usage_error, foreground_without_pidfile
from llmobserve.endpoints import check_port, listen_endpoint, listens_beyond_loopback
from llmobserve.events import MAX_FRAME_SIZE
from llmobserve.hostguard import HostGuard, public_name
from llmobserve.paths import default_db_path

from ._budget import DEFAULT_MAX_PARTIAL_BYTES
from ._open import DB_ENV, db_from_env, is_postgres_url, open_store
from ._retain import parse_span
from ._service import CollectorService
from ._store import StoreError

#: what plain text to the collector's TLS port is told
_TLS_HINT = "this port speaks TLS: use https:// (for a proxy's link: --collector https://...)"

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command-line options of C{twistd llmobserve-collector}."""

    synopsis = "[options]"
    longdesc = (
        "Collector for llmobserve events. One port serves the msgpack link from "
        "proxies (docs/LINK.md) and the HTTP API (/health, /api/events, /api/report). "
        "Events are stored in SQLite (WAL mode), deduplicated on their id, and "
        "acknowledged only after commit. See docs/COLLECTOR.md."
    )
    optFlags = [
        [
            "require-keys",
            None,
            "Require API keys on loopback too (always on when listening beyond "
            "loopback): an ingest key in each link's hello, a read key "
            "(Authorization: Bearer) on /api/*. Keys: llmobserve keys create --db.",
        ],
    ]
    optParameters = [
        [
            "port",
            "p",
            "8000",
            "Where to listen: a bare port number means 127.0.0.1; "
            "any Twisted endpoint string works (tcp:0:interface=127.0.0.1; "
            "ssl:8443:privateKey=key.pem:certKey=cert.pem for TLS on link and HTTP).",
        ],
        [
            "db",
            "d",
            None,
            "The event store: a SQLite file, or a PostgreSQL database as "
            "postgresql://user@host:5432/dbname (several collectors may share one). "
            f"Default: ${DB_ENV}, else $LLMOBSERVE_HOME/events.sqlite3, "
            "LLMOBSERVE_HOME defaulting to ~/.llmobserve.",
        ],
        [
            "heartbeat",
            None,
            10.0,
            "Link heartbeat interval in seconds; a link silent for 3 intervals is closed.",
            float,
        ],
        [
            "max-partial-bytes",
            None,
            DEFAULT_MAX_PARTIAL_BYTES,
            "Bytes all links together may hold for frames not yet complete; a link "
            "whose bytes would go past it is closed (at least 16777216, one largest frame).",
            int,
        ],
        [
            "retain",
            None,
            None,
            "Delete events older than this span (90d, 12h, 2w), at start-up and hourly; "
            "default: keep everything.",
        ],
        [
            "synchronous",
            None,
            "FULL",
            "SQLite synchronous mode for commits: FULL (acks survive power loss) or NORMAL.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        self["public-name"] = []

    def opt_public_name(self, name: str) -> None:
        """NAME: clients may reach this collector as NAME (Host: NAME[:PORT]),
        e.g. a docker compose service or an internal DNS name; besides IP
        literals and localhost, every other Host is refused (DNS rebinding).
        Repeatable."""
        try:
            self["public-name"].append(public_name(name))
        except ValueError as e:
            raise usage.UsageError(f"--public-name: {e}") from None

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse; under twistd a usage error is two lines on stderr and exit 2."""
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        except usage.UsageError as e:
            if self.parent is None:
                raise
            brief_usage_error("twistd llmobserve-collector", e)

    def postOptions(self) -> None:
        foreground_without_pidfile(self.parent)
        if self["db"] is None:
            self["db"] = db_from_env() or str(default_db_path())
        try:
            check_port(listen_endpoint(str(self["port"])))
        except ValueError as e:
            raise usage.UsageError(f"--port: {e}") from None
        if self["heartbeat"] <= 0:
            raise usage.UsageError("--heartbeat must be positive")
        if self["max-partial-bytes"] < MAX_FRAME_SIZE:
            raise usage.UsageError(
                f"--max-partial-bytes must be at least {MAX_FRAME_SIZE} (one largest frame)"
            )
        if self["retain"] is not None:
            try:
                self["retain"] = parse_span(str(self["retain"]))
            except ValueError as e:
                raise usage.UsageError(f"--retain: {e}") from None
        if str(self["synchronous"]).upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise usage.UsageError("--synchronous must be FULL, NORMAL, EXTRA or OFF")


def makeService(options: usage.Options) -> IService:
    """Build the collector from parsed options (the global reactor is used here only)."""
    from twisted.internet import reactor

    r: Any = reactor
    db: Path | str = options["db"]
    if not is_postgres_url(db):
        db = Path(db).expanduser()
    try:
        # Open once here so a bad path, an unreachable server or a newer
        # schema fails before the reactor runs, and the schema exists (is
        # migrated) before the threads open it.
        open_store(db).close()
    except (StoreError, OSError) as e:
        if options.parent is not None:
            # under twistd: one line and exit 1 (a UsageError is a traceback there)
            sys.stderr.write(f"twistd llmobserve-collector: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        raise usage.UsageError(str(e)) from e
    description = listen_endpoint(options["port"])
    require_keys = bool(options["require-keys"]) or listens_beyond_loopback(description)
    # on an ssl: port, plain text gets a hint rather than an empty reply
    endpoint = serverFromString(TLSHintReactor(r, _TLS_HINT), description)
    return CollectorService(
        r,
        endpoint,
        db,
        heartbeat=options["heartbeat"],
        synchronous=str(options["synchronous"]).upper(),
        scheme="https" if description.startswith("ssl:") else "http",
        host_guard=HostGuard(options["public-name"]),
        max_partial_bytes=options["max-partial-bytes"],
        on_listen_failure=lambda: stop_with_status(r, 1),
        require_keys=require_keys,
        retain=options["retain"],
    )
