"""Projects and API keys, kept in the store's file (contract: DESIGN.md,
"A shared deployment").

L{KeyStore} is the one place that knows how keys are kept. It is
synchronous and free of Twisted, like L{EventStore}, and works on the
connection it is given (L{SqlConnection}: the SQLite file's, or a
PostgreSQL store's, where every collector on the database shares the keys).

A key is C{llmo_} and 43 URL-safe characters (256 random bits). Only its
HMAC-SHA-256 under a secret of this store is kept (a per-store pepper: a
copied hash is useless against another store, and 256 random bits need no
slow hash). The digest is the lookup index; the match is confirmed with
C{hmac.compare_digest}. Every key has a short non-secret id (C{k_} and 8 hex
digits) that C{keys list} shows instead of the key.

The tables are the key store's own (C{llmo_keys}, C{llmo_key_meta}). In a
SQLite file they carry a version of their own in C{llmo_key_meta}, so they
migrate independently of the event table's C{user_version}; on PostgreSQL
they are created by the store's numbered migrations (C{_pgstore.py}). The
secret is made by the first store that finds none (C{ON CONFLICT DO
NOTHING}): collectors opening one database together agree on it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from typing import Any, Final

import attrs

from ._sql import DuplicateRow, MissingTable, SqlConnection, as_sql

__all__ = [
    "DEFAULT_PROJECT",
    "KEYS_SCHEMA_VERSION",
    "KEY_PREFIX",
    "SCOPES",
    "KeyInfo",
    "KeyStore",
    "KeyStoreError",
    "Verdict",
    "looks_like_key",
]

KEY_PREFIX: Final = "llmo_"
KEYS_SCHEMA_VERSION: Final = 1
DEFAULT_PROJECT: Final = "default"
#: What each scope may do: C{ingest} the link, C{read} GET /api/*, C{admin} all.
SCOPES: Final = ("ingest", "read", "admin")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS llmo_key_meta (name TEXT PRIMARY KEY NOT NULL, value TEXT)",
    """CREATE TABLE IF NOT EXISTS llmo_keys (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        project TEXT NOT NULL,
        scope TEXT NOT NULL,
        digest BLOB NOT NULL UNIQUE,
        created REAL NOT NULL,
        revoked REAL
    )""",
)


class KeyStoreError(Exception):
    """A key operation that cannot be done (a duplicate name, no such key)."""


@attrs.frozen
class KeyInfo:
    """A key as C{keys list} shows it: never the key itself."""

    id: str
    name: str
    project: str
    scope: str
    created: float
    revoked: float | None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Verdict:
    """What one presented key may do.

    @ivar reason: None when the key is valid, else why not (C{missing},
        C{unknown}, C{revoked}); never contains the key.
    """

    reason: str | None
    name: str | None = None
    project: str | None = None
    scope: str | None = None

    @property
    def valid(self) -> bool:
        return self.reason is None

    def allows(self, scope: str) -> bool:
        """True for a valid key whose scope covers C{scope} (admin covers all)."""
        return self.reason is None and self.scope in (scope, "admin")


MISSING: Final = Verdict("missing")
UNKNOWN: Final = Verdict("unknown")


def looks_like_key(text: str) -> bool:
    """True for text shaped like a key (C{llmo_...}), as opposed to a name."""
    return text.startswith(KEY_PREFIX) and len(text) > len(KEY_PREFIX) + 16


class KeyStore:
    """Keys in the store (its SQLite file, or its PostgreSQL database).

    @param db: an open connection in autocommit mode (a C{sqlite3} one with
        C{isolation_level=None}, or a L{SqlConnection}), used by one thread
        at a time; on SQLite the key tables are created if missing.
    """

    def __init__(self, db: sqlite3.Connection | SqlConnection) -> None:
        self._db = as_sql(db)
        if self._db.dialect == "sqlite":
            self._migrate(self._db)
        self._secret = self._load_secret()

    @staticmethod
    def _migrate(db: SqlConnection) -> None:
        try:
            row = db.execute("SELECT value FROM llmo_key_meta WHERE name = 'version'").fetchone()
        except (sqlite3.OperationalError, MissingTable):
            row = None
        version = int(row[0]) if row else 0
        if version > KEYS_SCHEMA_VERSION:
            raise KeyStoreError(
                f"key store schema {version} is newer than this llmobserve ({KEYS_SCHEMA_VERSION})"
            )
        if version == KEYS_SCHEMA_VERSION:
            return
        with db.transaction():
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO llmo_key_meta (name, value) VALUES ('version', ?)",
                (str(KEYS_SCHEMA_VERSION),),
            )

    def _load_secret(self) -> bytes:
        select = "SELECT value FROM llmo_key_meta WHERE name = 'secret'"
        row = self._db.execute(select).fetchone()
        if row is None:
            # the first store here makes it; one made at the same moment wins
            self._db.execute(
                "INSERT INTO llmo_key_meta (name, value) VALUES ('secret', ?)"
                " ON CONFLICT (name) DO NOTHING",
                (secrets.token_hex(32),),
            )
            row = self._db.execute(select).fetchone()
        return bytes.fromhex(row[0])

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("utf-8", "replace"), hashlib.sha256).digest()

    def create(
        self, name: str, project: str = DEFAULT_PROJECT, scope: str = "ingest"
    ) -> tuple[KeyInfo, str]:
        """A new key; returns its listing and the key (shown once, never stored).

        @raise KeyStoreError: a bad scope, an empty name or project, a name in use.
        """
        if scope not in SCOPES:
            raise KeyStoreError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
        if not name.strip() or not project.strip():
            raise KeyStoreError("a key needs a non-empty name and project")
        if looks_like_key(name):
            raise KeyStoreError("a key's name must not look like a key")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(
            id="k_" + secrets.token_hex(4),
            name=name,
            project=project,
            scope=scope,
            created=time.time(),
            revoked=None,
        )
        try:
            self._db.execute(
                "INSERT INTO llmo_keys (id, name, project, scope, digest, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (info.id, name, project, scope, self._digest(key), info.created),
            )
        except DuplicateRow:
            raise KeyStoreError(f"a key named {name!r} exists already") from None
        return info, key

    def list(self) -> list[KeyInfo]:
        """Every key, revoked ones included, oldest first."""
        rows = self._db.execute(
            "SELECT id, name, project, scope, created, revoked FROM llmo_keys ORDER BY created"
        )
        return [KeyInfo(*row) for row in rows]

    def revoke(self, name_or_key: str) -> KeyInfo:
        """Revoke a key given by its name, its id or the key itself.

        @raise KeyStoreError: no such key (the message never repeats a key).
        """
        args: tuple[Any, ...]
        if looks_like_key(name_or_key):
            where, args, shown = "digest = ?", (self._digest(name_or_key),), "the key given"
        else:
            where, args, shown = "name = ? OR id = ?", (name_or_key,) * 2, repr(name_or_key)
        row = self._db.execute(f"SELECT id FROM llmo_keys WHERE {where}", args).fetchone()
        if row is None:
            raise KeyStoreError(f"no key matches {shown}")
        self._db.execute(
            "UPDATE llmo_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
            (time.time(), row[0]),
        )
        return next(k for k in self.list() if k.id == row[0])

    def verify(self, key: str | None) -> Verdict:
        """What C{key} may do (a L{Verdict} whose reason is None when valid)."""
        if not key:
            return MISSING
        digest = self._digest(key)
        row = self._db.execute(
            "SELECT digest, name, project, scope, revoked FROM llmo_keys WHERE digest = ?",
            (digest,),
        ).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), digest):
            return UNKNOWN
        if row[4] is not None:
            return Verdict("revoked")
        return Verdict(None, name=row[1], project=row[2], scope=row[3])
