"""Which store a C{--db} value names: a SQLite file or a PostgreSQL database.

C{postgresql://...} (or C{postgres://...}) opens L{PgEventStore}; anything
else is a file path for L{EventStore}. psycopg is imported only for the
former, so the SQLite path (the CLI, the embedded proxy) never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ._store import EventStore, Store

__all__ = ["DB_ENV", "db_from_env", "is_postgres_url", "open_store"]

#: The environment variable naming the store when C{--db} is not given.
DB_ENV = "LLMOBSERVE_DB"


def is_postgres_url(db: object) -> bool:
    """Whether a C{--db} value names a PostgreSQL database rather than a file."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def db_from_env() -> str | None:
    """C{$LLMOBSERVE_DB} if set and not empty."""
    return os.environ.get(DB_ENV) or None


def open_store(
    db: str | os.PathLike[str],
    *,
    synchronous: str = "FULL",
    log: Callable[[str], None] | None = None,
    migrate: bool = True,
) -> Store:
    """Open the store C{db} names.

    @param synchronous: SQLite's C{synchronous} (PostgreSQL commits are
        always durable before they are acknowledged).
    @param log: PostgreSQL only: told of connection loss and recovery.
    @param migrate: PostgreSQL only: create or migrate the schema.
    @raise StoreError: the store cannot be opened, or its schema is newer.
    """
    if is_postgres_url(db):
        from ._pgstore import PgEventStore

        return PgEventStore(str(db), log=log, migrate=migrate)
    return EventStore(Path(db).expanduser(), synchronous=synchronous)
