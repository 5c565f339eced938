"""The connection the key, budget, limit and grant books work on, either back end.

The books (L{KeyStore}, L{SqlBudgetBook}, L{RateLimitBook}, L{GrantBook})
write one SQL for both back ends: C{?} placeholders, C{INSERT ... ON
CONFLICT}, no SQLite-only functions, and C{"window"} quoted (a reserved
word in PostgreSQL). L{SqlConnection} is what they need of a connection:
C{execute}, a C{transaction} that serialises the writers of one key (a
budget's grants), and the dialect's expressions for scope fields that are
not plain columns. L{SQLiteSql} wraps a C{sqlite3} connection; L{PgSql}
runs on a L{PgEventStore}'s connection (reconnecting as its reads do).

The books' tables are created by the books themselves on SQLite (C{CREATE
TABLE IF NOT EXISTS}, as before), and by the numbered migrations of
C{_pgstore.py} on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from ._pgstore import PgEventStore

__all__ = ["DuplicateRow", "MissingTable", "PgSql", "SQLiteSql", "SqlConnection", "as_sql"]

#: The first half of PostgreSQL's two-key advisory lock of a budget's grants
#: (the second is the hash of the budget's name).
_GRANT_LOCK: Final = 0x6C6C6D6F


class DuplicateRow(Exception):
    """An insert hit a unique constraint (a key name in use)."""


class MissingTable(Exception):
    """The table is not there (a SQLite file with no events yet)."""


class Rows(Protocol):
    """What C{execute} answers: a cursor's reading side."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class SqlConnection(Protocol):
    """A connection in autocommit mode, for one thread at a time.

    @ivar dialect: C{sqlite} or C{postgresql}.
    @ivar scope_sql: a budget's scope field -> the SQL expression it tests,
        where that is not the column L{SCOPE_FIELDS} names.
    """

    dialect: str
    scope_sql: Mapping[str, str]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement (C{?} placeholders)."""

    def transaction(self, lock: str | None = None) -> Any:
        """A context manager: one transaction, committed on leaving it;
        writers holding the same C{lock} take turns."""


class SQLiteSql:
    """L{SqlConnection} on a C{sqlite3} connection (C{isolation_level=None})."""

    dialect = "sqlite"
    scope_sql: Mapping[str, str] = {"project": "json_extract(extra, '$.project')"}

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            return self.db.execute(sql, params)
        except sqlite3.IntegrityError as e:
            raise DuplicateRow(str(e)) from None
        except sqlite3.OperationalError as e:
            if str(e).startswith("no such table"):
                raise MissingTable(str(e)) from None
            raise

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the file's write lock: every writer takes turns
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


class _Result:
    """A PostgreSQL statement's rows, fetched at once (so a lost connection
    is an error of C{execute}, where L{PgSql} turns it into L{StoreUnavailable})."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


@lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PgSql:
    """L{SqlConnection} on a L{PgEventStore}'s connection.

    A lost connection is dropped and raised as L{StoreUnavailable}; the next
    statement connects again. A transaction with a C{lock} first takes the
    advisory lock of that name, held until it commits: two collectors on one
    database hand out a budget's grants one after the other.
    """

    dialect = "postgresql"

    def __init__(self, store: PgEventStore) -> None:
        from ._pgstore import _PROJECT

        self._store = store
        self.scope_sql: Mapping[str, str] = {"project": _PROJECT}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        import psycopg

        from ._store import StoreUnavailable

        try:
            cur = self._store._connection().execute(_pg_sql(sql), tuple(params))
            rows = cur.fetchall() if cur.description is not None else []
            return _Result(rows, max(cur.rowcount, 0))
        except psycopg.errors.UniqueViolation as e:
            raise DuplicateRow(str(e)) from None
        except psycopg.errors.UndefinedTable as e:
            raise MissingTable(str(e)) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            self._store._drop()
            raise StoreUnavailable(f"PostgreSQL unreachable: {e}") from e

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[None]:
        import psycopg

        from ._store import StoreUnavailable

        try:
            conn = self._store._connection()
            with conn.transaction():
                if lock is not None:
                    conn.execute(
                        f"SELECT pg_advisory_xact_lock({_GRANT_LOCK}, hashtext(%s))", (lock,)
                    )
                yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            self._store._drop()
            raise StoreUnavailable(f"PostgreSQL unreachable: {e}") from e


def as_sql(db: sqlite3.Connection | SqlConnection) -> SqlConnection:
    """C{db} as a L{SqlConnection} (a bare C{sqlite3} connection is wrapped)."""
    if isinstance(db, sqlite3.Connection):
        return SQLiteSql(db)
    return db
