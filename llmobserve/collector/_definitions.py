"""Named definitions kept as JSON in one table of the store.

Budgets (C{budgets}) and rate limits (C{rate_limits}) are both rows of
C{(name, definition, updated_at)}: set replaces by name, list reads them in
byte order of their names and skips a row that no longer parses (written by
a newer version, or by hand), delete says whether there was one.
L{DefinitionTable} is that table for either back end; the books
(L{SqlBudgetBook}, L{RateLimitBook}) keep one each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, Protocol, TypeVar

from llmobserve.collector._sql import SqlConnection

__all__ = ["DefinitionTable"]

_TABLES: Final = frozenset({"budgets", "rate_limits"})


class _Definition(Protocol):
    @property
    def name(self) -> str: ...

    def as_dict(self) -> dict[str, Any]: ...


D = TypeVar("D", bound=_Definition)


class DefinitionTable(Generic[D]):
    """The definitions of one kind in their table (created here on SQLite;
    on PostgreSQL the store's migrations made it).

    @param parse: a definition from its JSON form; raises C{ValueError}
        (C{BudgetError} is one) for a row it cannot use.
    """

    def __init__(
        self, db: SqlConnection, table: str, parse: Callable[[Mapping[str, Any]], D]
    ) -> None:
        if table not in _TABLES:  # a fixed name: it goes into the SQL text
            raise ValueError(f"not a definitions table: {table!r}")
        self._db = db
        self._table = table
        self._parse = parse
        if db.dialect == "sqlite":
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                " name TEXT PRIMARY KEY NOT NULL,"
                " definition TEXT NOT NULL,"
                " updated_at REAL NOT NULL)"
            )

    def set(self, definition: D) -> None:
        """Create or replace the definition of that name."""
        self._db.execute(
            f"INSERT INTO {self._table} (name, definition, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET"
            " definition = excluded.definition, updated_at = excluded.updated_at",
            (definition.name, json.dumps(definition.as_dict(), sort_keys=True), time.time()),
        )

    def list(self) -> list[D]:
        """Every definition, by name (a row that no longer parses is skipped)."""
        out = []
        # byte order on both back ends, whatever the database's collation
        order = 'name COLLATE "C"' if self._db.dialect == "postgresql" else "name"
        for (text,) in self._db.execute(f"SELECT definition FROM {self._table} ORDER BY {order}"):
            try:
                out.append(self._parse(json.loads(text)))
            except ValueError:  # BudgetError, or JSON that is not
                continue
        return out

    def delete(self, name: str) -> bool:
        """Remove a definition; False when there was none of that name."""
        cur = self._db.execute(f"DELETE FROM {self._table} WHERE name = ?", (name,))
        return cur.rowcount > 0
