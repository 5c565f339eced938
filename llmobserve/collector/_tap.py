"""C{twistd llmobserve-collector}: options and C{makeService}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from llmobserve._exit import stop_with_status
from llmobserve._twistd import brief_usage_error, foreground_without_pidfile
from llmobserve.endpoints import check_port, listen_endpoint
from llmobserve.paths import default_db_path

from ._service import CollectorService
from ._store import EventStore, StoreError

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
    optParameters = [
        [
            "port",
            "p",
            "8000",
            "Where to listen: a bare port number means 127.0.0.1; "
            "any Twisted endpoint string works (tcp:0:interface=127.0.0.1).",
        ],
        [
            "db",
            "d",
            None,
            "The SQLite event store (default: $LLMOBSERVE_HOME/events.sqlite3, "
            "LLMOBSERVE_HOME defaulting to ~/.llmobserve).",
        ],
        [
            "heartbeat",
            None,
            10.0,
            "Link heartbeat interval in seconds; a link silent for 3 intervals is closed.",
            float,
        ],
        [
            "synchronous",
            None,
            "FULL",
            "SQLite synchronous mode for commits: FULL (acks survive power loss) or NORMAL.",
        ],
    ]

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
            self["db"] = str(default_db_path())
        try:
            check_port(listen_endpoint(str(self["port"])))
        except ValueError as e:
            raise usage.UsageError(f"--port: {e}") from None
        if self["heartbeat"] <= 0:
            raise usage.UsageError("--heartbeat must be positive")
        if str(self["synchronous"]).upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise usage.UsageError("--synchronous must be FULL, NORMAL, EXTRA or OFF")


def makeService(options: usage.Options) -> IService:
    """Build the collector from parsed options (the global reactor is used here only)."""
    from twisted.internet import reactor

    r: Any = reactor
    db_path = Path(options["db"]).expanduser()
    try:
        # Open once here so a bad path or a newer schema fails before the
        # reactor runs, and the schema exists before the threads open it.
        EventStore(db_path).close()
    except (StoreError, OSError) as e:
        raise usage.UsageError(str(e)) from e
    endpoint = serverFromString(r, listen_endpoint(options["port"]))
    return CollectorService(
        r,
        endpoint,
        db_path,
        heartbeat=options["heartbeat"],
        synchronous=str(options["synchronous"]).upper(),
        on_listen_failure=lambda: stop_with_status(r, 1),
    )
