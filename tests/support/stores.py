"""Reading a store's tables from a test: a PostgreSQL URL or a SQLite file.

Tests that run the same scenario on both back ends (the C{shared_db}
fixture) read what the collectors stored through L{row}, without caring
which one it is.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

__all__ = ["StoreUnreadable", "row"]


class StoreUnreadable(Exception):
    """The store cannot be read now: its server is away, or its file is not there yet."""


def row(db: str, sql: str) -> tuple[Any, ...]:
    """The first row of C{sql} on C{db} (a C{postgresql://} URL, or a SQLite
    file, opened read-only so that a query before the collector starts does
    not create it)."""
    if "://" in db:
        import psycopg

        try:
            with psycopg.connect(db, connect_timeout=5) as conn:
                found = conn.execute(sql).fetchone()
        except psycopg.Error as e:
            raise StoreUnreadable(str(e)) from e
    else:
        try:
            uri = f"file:{db}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
                found = conn.execute(sql).fetchone()
        except sqlite3.Error as e:
            raise StoreUnreadable(str(e)) from e
    assert found is not None, sql
    return tuple(found)
