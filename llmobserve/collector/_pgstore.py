"""The PostgreSQL event store: the collector's back end for several collectors.

L{PgEventStore} is L{Store} over one psycopg 3 connection, synchronous and
free of Twisted like L{EventStore}: the collector's writer thread owns one,
its reader thread another. Several collectors may share one database: the
event C{id} is the primary key and every insert is C{ON CONFLICT (id) DO
NOTHING}, so an event delivered twice (a resend after a lost ack, or to a
second collector after a failover) is stored once.

Rows are the SQLite store's rows (L{EventStore.rows_for}: same columns,
same JSON), written in one transaction per batch: C{COPY} into a temporary
table, then one C{INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING} in
arrival order (C{seq}, a sequence, plays SQLite's C{rowid}). PostgreSQL
columns are typed where SQLite's are not: a batch the server refuses for a
value that does not fit its column (text in a number column, a NUL
character, a lone surrogate) is written again with every row made to fit
(L{_fitted}: the value moves to the C{extra} JSON and reads back the same).

The schema is created and migrated on start-up by numbered migrations
(L{MIGRATIONS}) under an advisory lock, so collectors starting together
apply each once; a database whose schema is newer than this code knows is
refused with a L{StoreError}.

Connection loss: L{PgEventStore.insert} reconnects with backoff (0.1 s
doubling to 5 s) for up to C{outage_wait} seconds and then raises
L{StoreError}; nothing is committed, so the writer acknowledges nothing and
the proxies resend. Reads reconnect once and then raise L{StoreError}.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import psycopg

from llmobserve.events import MAX_EVENT_DEPTH

from ._pgrollup import MIGRATION as ROLLUP_MIGRATION
from ._pgrollup import ROLLUP_FILTERS, ROLLUP_GROUPS, report_sql, rollup_window
from ._pgsummary import MIGRATION as SUMMARY_MIGRATION
from ._pgsummary import SummaryParts, summary_parts
from ._sql import PgSql
from ._store import (
    _COLUMNS,
    _CONTEXT_COLUMNS,
    _JSON_FIELDS,
    _ROW_COLUMNS,
    _SCALARS,
    _TOKEN_COLUMNS,
    FILTERS,
    GROUPS,
    Store,
    StoreError,
    StoreUnavailable,
    _dumps,
    _loads,
    _row,
    _rows,
)

__all__ = ["MIGRATIONS", "PG_SCHEMA_VERSION", "PgEventStore"]

#: The PostgreSQL type of each SQLite column type.
_PG_TYPES: Final = {"TEXT": "text", "REAL": "double precision", "INTEGER": "bigint"}

#: Each column's kind: C{text}, C{float} or C{int}.
_KIND_OF: Final[dict[str, str]] = {
    "id": "text",
    **{n: {"TEXT": "text", "REAL": "float", "INTEGER": "int"}[k] for n, k in _SCALARS.items()},
    **{n: "text" for n in _JSON_FIELDS},
    **{n: "text" for n in _CONTEXT_COLUMNS},
    **{n: "int" for n in _TOKEN_COLUMNS},
    "extra": "text",
}
_PG_COLUMN: Final = {"text": "text", "float": "double precision", "int": "bigint"}


def _columns_sql() -> str:
    return ",\n    ".join(f"{name} {_PG_COLUMN[_KIND_OF[name]]}" for name in _COLUMNS[1:])


#: The migrations, in order: migration C{n} (1-based) brings the schema to
#: version C{n}. Append only; never edit a released one.
MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
    CREATE TABLE events (
        id text PRIMARY KEY NOT NULL,
        {_columns_sql()},
        seq bigserial NOT NULL
    );
    -- the order of the events page (ts NULLS FIRST, seq): a page is an index walk
    CREATE INDEX events_ts ON events (ts NULLS FIRST, seq);
    CREATE TABLE links (
        proxy_id text PRIMARY KEY NOT NULL,
        acked_seq bigint NOT NULL,
        updated_at double precision NOT NULL
    );
    """,
    # every report filters on kind = 'call' and most on a time range
    """
    CREATE INDEX events_kind_ts ON events (kind, ts);
    """,
    # API keys, budgets, rate limits and budget grants: the SQLite store's
    # tables of the same names (_keys.py, _budgets.py, _limits.py, _grants.py)
    """
    CREATE TABLE llmo_key_meta (name text PRIMARY KEY NOT NULL, value text);
    CREATE TABLE llmo_keys (
        id text PRIMARY KEY NOT NULL,
        name text NOT NULL UNIQUE,
        project text NOT NULL,
        scope text NOT NULL,
        digest bytea NOT NULL UNIQUE,
        created double precision NOT NULL,
        revoked double precision
    );
    CREATE TABLE budgets (
        name text PRIMARY KEY NOT NULL,
        definition text NOT NULL,
        updated_at double precision NOT NULL
    );
    CREATE TABLE rate_limits (
        name text PRIMARY KEY NOT NULL,
        definition text NOT NULL,
        updated_at double precision NOT NULL
    );
    CREATE TABLE budget_grants (
        budget text NOT NULL,
        "window" text NOT NULL,
        holder text NOT NULL,
        granted bigint NOT NULL,
        spent bigint NOT NULL,
        seen double precision NOT NULL,
        PRIMARY KEY (budget, "window", holder)
    );
    """,
    # the hourly rollup the reports read (_pgrollup)
    ROLLUP_MIGRATION,
    # the latency histogram, errors and unpriced reasons the summary reads (_pgsummary)
    SUMMARY_MIGRATION,
)
PG_SCHEMA_VERSION: Final = len(MIGRATIONS)
#: The schema version from which the rollup tables are there.
_ROLLUP_VERSION: Final = MIGRATIONS.index(ROLLUP_MIGRATION) + 1
#: The schema version from which the summary's tables are there.
_SUMMARY_VERSION: Final = MIGRATIONS.index(SUMMARY_MIGRATION) + 1

#: Any constant: collectors migrating at once take turns on it.
_MIGRATION_LOCK: Final = 0x6C6C6D6F62
_SCHEMA_TABLE: Final = "llmobserve_schema"

_N: Final = len(_ROW_COLUMNS)
_PADS: Final = tuple((None,) * (_N - n) for n in range(_N + 1))
_ROW_KINDS: Final = tuple(_KIND_OF[name] for name in _ROW_COLUMNS)
_EXTRA_AT: Final = _ROW_COLUMNS.index("extra")
_MOVABLE: Final = frozenset(("id", *_SCALARS))
_INT64: Final = 2**63
_FLOAT_COLUMNS: Final = frozenset(n for n in _ROW_COLUMNS if _KIND_OF[n] == "float")

_COPY_SQL: Final = f"COPY events_in ({', '.join(_ROW_COLUMNS)}) FROM STDIN"
# NaN fits a double precision column but has no JSON spelling: NULL, as SQLite stores it
_SELECT_IN: Final = ", ".join(
    f"NULLIF({n}, 'NaN')" if n in _FLOAT_COLUMNS else n for n in _ROW_COLUMNS
)
_INSERT_SQL: Final = (
    f"INSERT INTO events ({', '.join(_ROW_COLUMNS)}) "
    f"SELECT {_SELECT_IN} FROM events_in ORDER BY ord "
    "ON CONFLICT (id) DO NOTHING"
)
_TEMP_SQL: Final = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS events_in ("
    "ord bigserial, "
    + ", ".join(f"{n} {_PG_COLUMN[_KIND_OF[n]]}" for n in _ROW_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_LINKS_SQL: Final = (
    "INSERT INTO links (proxy_id, acked_seq, updated_at) VALUES (%s, %s, %s) "
    "ON CONFLICT (proxy_id) DO UPDATE SET "
    "acked_seq = excluded.acked_seq, updated_at = excluded.updated_at"
)

#: Timestamps PostgreSQL can turn into a date (years 1 to 9999).
_TS_RANGE: Final = "ts BETWEEN -62135596800 AND 253402300799"
#: A key's project, kept in the extra JSON (as SQLite's json_extract reads it).
_PROJECT: Final = "(extra::jsonb ->> 'project')"

_PG_FILTERS: Final[dict[str, str]] = {**FILTERS, "project": _PROJECT}

# floor(ts): the hour and day a call falls in (to_timestamp rounds to the
# microsecond, which would put 15:59:59.9999998 in 16:00, where a window
# ending at 16:00 and the rollup's hours do not)
_PG_GROUPS: Final[dict[str, str]] = {
    **GROUPS,
    "project": _PROJECT,
    "day": f"CASE WHEN {_TS_RANGE} THEN "
    "to_char(to_timestamp(floor(ts)) AT TIME ZONE 'UTC', 'YYYY-MM-DD') END",
    "hour": f"CASE WHEN {_TS_RANGE} THEN "
    "to_char(to_timestamp(floor(ts)) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":00Z\"') END",
}

#: A value the server (or the driver) refuses: rows are made to fit.
_VALUE_ERRORS: Final = (psycopg.DataError, UnicodeError, ValueError, OverflowError)

#: Errors of the connection or the server's availability: retried.
_CONNECTION_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError)


def _text_fits(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _fitted(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """C{row} padded to every column, each value fitting its column's type.

    A value that does not fit moves into the C{extra} JSON under its field
    name (the event reads back the same); a label or token count, a copy of
    what the C{context} or C{usage} JSON holds, is left NULL. An integral
    float in an integer column becomes an int and a number in a text column
    its text, as SQLite's column affinity does.
    """
    cells = list(row + _PADS[len(row)])
    moved: dict[str, Any] = {}
    for i, kind in enumerate(_ROW_KINDS):
        value = cells[i]
        if value is None:
            continue
        t = type(value)
        fits = False
        if kind == "text":
            if t is str:
                fits = _text_fits(value)
            elif t is int or t is float:
                cells[i] = value = str(value)
                fits = True
        elif kind == "float":
            if t is float or (t is int and abs(value) < 2**1023):
                cells[i] = float(value) if math.isfinite(value) else None
                fits = True
        elif t is int:
            fits = -_INT64 <= value < _INT64
        elif t is float and value.is_integer() and -_INT64 <= value < _INT64:
            cells[i] = int(value)
            fits = True
        if not fits:
            cells[i] = None
            name = _ROW_COLUMNS[i]
            if name in _MOVABLE:
                moved[name] = value
    if moved:
        if "id" in moved:
            text = str(moved["id"]).encode("utf-8", "surrogatepass")
            cells[0] = "pg-" + hashlib.sha256(text).hexdigest()[:32]
        extra_text = cells[_EXTRA_AT]
        extra = {} if extra_text is None else _loads(extra_text)
        extra.update(moved)
        cells[_EXTRA_AT] = _dumps(extra, MAX_EVENT_DEPTH)
    return tuple(cells)


class PgEventStore(Store):
    """Events in one PostgreSQL database, synchronous, for one thread at a time.

    @param url: a libpq connection URL (C{postgresql://user@host:5432/db}).
    @param outage_wait: how long L{insert} keeps reconnecting (seconds)
        before it gives up with a L{StoreError}.
    @param log: told (a line of text) of each connection loss and recovery.
    @param migrate: create or migrate the schema on opening (the collector's
        start-up does it once, before its threads open their stores).
        Without it an unreachable server is not an error yet: the first
        operation connects (and checks the schema's version).
    @raise StoreError: the database cannot be reached or its schema is newer.
    """

    _P = "%s"
    _NO_LIMIT = None
    _GROUPS = _PG_GROUPS
    _FILTERS = _PG_FILTERS
    _EVENT_ORDER = "ts NULLS FIRST, seq"
    _EVENT_ORDER_DESC = "ts DESC NULLS LAST, seq DESC"
    # float8 addition raises past the float range where SQLite gives inf
    _COST_SUM = "sum(cost_usd::numeric)"

    def __init__(
        self,
        url: str,
        *,
        outage_wait: float = 30.0,
        log: Callable[[str], None] | None = None,
        migrate: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.last_rejected = []
        self._outage_wait = outage_wait
        self._log = log
        self._sleep = sleep
        self._conn: psycopg.Connection[Any] | None = None
        self._checked = False
        #: the schema version the database had when last checked
        self._schema: int | None = None
        try:
            if migrate:
                self._migrate(self._connection())
            else:
                self._connection()
        except _CONNECTION_ERRORS as e:
            self._drop()
            if migrate:
                raise StoreError(f"cannot open event store {_safe_url(url)}: {e}") from e
            # a collector's thread (the start-up migrated): its first job
            # connects, and fails or waits as any job does while the server is away
        except psycopg.Error as e:
            self._drop()
            raise StoreError(f"cannot open event store {_safe_url(url)}: {e}") from e

    # -- connection ---------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            conn.execute("SET TIME ZONE 'UTC'")
            if not self._checked:
                # every connection until one has seen the schema's version
                try:
                    self._check_version(conn)
                except BaseException:
                    conn.close()
                    raise
                self._checked = True
            self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection: nothing to save
                pass

    # -- schema -------------------------------------------------------------

    def _version(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_SCHEMA_TABLE,)).fetchone()
        if row is None or not row[0]:
            return 0
        found = conn.execute(f"SELECT max(version) FROM {_SCHEMA_TABLE}").fetchone()
        return int(found[0] or 0) if found else 0

    def _check_version(self, conn: psycopg.Connection[Any]) -> int:
        version = self._version(conn)
        self._schema = version
        if version > PG_SCHEMA_VERSION:
            raise StoreError(
                f"store schema {version} in {_safe_url(self.url)} is newer than this "
                f"llmobserve ({PG_SCHEMA_VERSION}): upgrade llmobserve to use it"
            )
        return version

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_SCHEMA_TABLE} "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = self._check_version(conn)
            for number in range(version + 1, PG_SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[number - 1])
                conn.execute(f"INSERT INTO {_SCHEMA_TABLE} (version) VALUES (%s)", (number,))
            self._schema = max(version, PG_SCHEMA_VERSION)

    # -- writing ------------------------------------------------------------

    def insert(
        self,
        events: Iterable[Mapping[str, Any]],
        acked_seqs: Mapping[str, int] | None = None,
        now: float | None = None,
    ) -> int:
        """Store events in one transaction; return how many were new.

        As L{EventStore.insert}. While the server cannot be reached this
        retries with backoff for up to C{outage_wait} seconds (the caller
        waits: no ack goes out meanwhile), then raises L{StoreError}.
        """
        if not isinstance(events, list | tuple):
            events = list(events)
        rejected: list[tuple[str, str]] = []
        rows = _rows(events, rejected)
        inserted = self._write(rows, acked_seqs, now, rejected)
        self.last_rejected = rejected
        return inserted

    def insert_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        *,
        pause: Callable[[], None] | None = None,
        chunk: int = 8,
    ) -> int:
        """L{insert} for rows made by L{EventStore.row_for} (C{pause} is not used)."""
        return self._write(rows, None, None)

    def _write(
        self,
        rows: Sequence[tuple[Any, ...]],
        acked_seqs: Mapping[str, int] | None,
        now: float | None,
        rejected: list[tuple[str, str]] | None = None,
    ) -> int:
        delay = 0.1
        deadline = time.monotonic() + self._outage_wait
        lost = False
        while True:
            try:
                conn = self._connection()
                try:
                    inserted = self._transaction(conn, rows, acked_seqs, now, fitted=False)
                except _VALUE_ERRORS:
                    # a value the typed columns refuse: every row made to fit
                    try:
                        inserted = self._transaction(conn, rows, acked_seqs, now, fitted=True)
                    except _VALUE_ERRORS:
                        inserted = self._one_by_one(conn, rows, acked_seqs, now, rejected)
            except _CONNECTION_ERRORS as e:
                self._drop()
                if not lost:
                    lost = True
                    self._say(f"PostgreSQL connection lost ({_first_line(e)}); reconnecting")
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"PostgreSQL unreachable for {self._outage_wait:g} s: {_first_line(e)}"
                    ) from e
                self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if lost:
                self._say("PostgreSQL connection back; writing again")
            return inserted

    def _transaction(
        self,
        conn: psycopg.Connection[Any],
        rows: Sequence[tuple[Any, ...]],
        acked_seqs: Mapping[str, int] | None,
        now: float | None,
        fitted: bool,
    ) -> int:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(_TEMP_SQL)
            with cur.copy(_COPY_SQL) as copy:
                write = copy.write_row
                if fitted:
                    for row in rows:
                        write(_fitted(row))
                else:
                    pads = _PADS
                    for row in rows:
                        write(row + pads[len(row)])
            cur.execute(_INSERT_SQL)
            inserted = max(cur.rowcount, 0)
            if acked_seqs:
                when = time.time() if now is None else now
                cur.executemany(_LINKS_SQL, [(p, s, when) for p, s in acked_seqs.items()])
        return inserted

    def _one_by_one(
        self,
        conn: psycopg.Connection[Any],
        rows: Sequence[tuple[Any, ...]],
        acked_seqs: Mapping[str, int] | None,
        now: float | None,
        rejected: list[tuple[str, str]] | None,
    ) -> int:
        """The last resort: each row in a transaction of its own; a row the
        server still refuses is stored as a rejected record (as SQLite does
        with an event it cannot convert), so one event never blocks a batch."""
        inserted = 0
        for row in rows:
            try:
                inserted += self._transaction(conn, [row], None, now, fitted=True)
            except _VALUE_ERRORS as e:
                reason = f"{type(e).__name__}: {_first_line(e)}"[:200]
                record = _row({"id": str(row[0]), "kind": "rejected", "reason": reason})
                inserted += self._transaction(conn, [record], None, now, fitted=True)
                if rejected is not None:
                    rejected.append((str(row[0]), reason))
        if acked_seqs:
            self._transaction(conn, [], acked_seqs, now, fitted=True)
        return inserted

    def _say(self, line: str) -> None:
        if self._log is not None:
            self._log(line)

    # -- reading ------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any]) -> Iterable[Sequence[Any]]:
        for attempt in (1, 2):
            try:
                with self._connection().cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall()
            except _CONNECTION_ERRORS as e:
                self._drop()
                if attempt == 2:
                    raise StoreUnavailable(f"PostgreSQL unreachable: {_first_line(e)}") from e
        raise AssertionError("unreachable")

    def _change(self, sql: str, params: Sequence[Any]) -> int:
        try:
            return max(0, self._connection().execute(sql, params).rowcount)
        except _CONNECTION_ERRORS as e:
            self._drop()
            raise StoreUnavailable(f"PostgreSQL unreachable: {_first_line(e)}") from e

    def report(
        self,
        by: Sequence[str] = ("provider", "model"),
        since: float | None = None,
        until: float | None = None,
        **filters: str | None,
    ) -> list[dict[str, Any]]:
        """L{Store.report}: the same rows, from the hourly rollup where it
        can answer (every group and filter one of its dimensions, a window
        holding a whole hour): its whole hours plus the events of the
        window's ragged edges. Any other report reads the events."""
        groups = self._report_groups(by)
        given = {name: value for name, value in filters.items() if value is not None}
        hours = rollup_window(since, until)
        if hours is None or not self.rollup_answers(groups, given) or not self._has_rollup():
            return super().report(by, since=since, until=until, **filters)
        given.pop("kind", None)  # a report counts calls whatever it is given
        exprs = {**self._GROUPS, "project": "project"}
        where, params = self._where(given, None, None, {**self._FILTERS, "project": "project"})
        cost = "CASE WHEN sum(calls) > sum(unpriced) THEN sum(cost) END"
        order = self._report_order(groups, exprs, cost, "coalesce(sum(calls), 0)")
        project = "project" in groups or "project" in given
        sql, all_params = report_sql(
            groups, exprs, hours, since, until, where, params, order, project
        )
        return self._report_rows(groups, self._query(sql, all_params))

    def _has_rollup(self, version: int = _ROLLUP_VERSION) -> bool:
        """Whether the database has the rollup tables (C{llmobserve report}
        never migrates: a database an older collector keeps may lack them)."""
        if self._schema is None:
            self._query("SELECT 1", ())  # connects, which reads the schema's version
        return (self._schema or 0) >= version

    def summary_rollup(
        self, since: float | None, until: float | None, top_reasons: int
    ) -> SummaryParts | None:
        """L{Store.summary_rollup}: from the rollup's and the summary's
        tables (L{summary_parts}) when the window holds three whole hours
        and the database has them (schema 5)."""
        if not self._has_rollup(_SUMMARY_VERSION):
            return None
        return summary_parts(self.read, since, until, top_reasons)

    def rollup_answers(self, by: Sequence[str], filters: Mapping[str, str | None]) -> bool:
        """L{Store.rollup_answers}: every group and filter is a dimension of
        the rollup (a window without a whole hour reads the events too)."""
        given = (name for name, value in filters.items() if value is not None)
        return ROLLUP_GROUPS.issuperset(by) and ROLLUP_FILTERS.issuperset(given)

    def _group_order(self, index: int, expr: str) -> str:
        return self.text_order(expr)

    def text_order(self, expr: str) -> str:
        """Byte order, NULL first, as SQLite sorts (whatever the database's
        collation; PostgreSQL puts NULL last by itself)."""
        return f'{expr} COLLATE "C" NULLS FIRST'

    def acked_seq(self, proxy_id: str) -> int | None:
        """The last batch C{seq} acknowledged to this proxy, if any."""
        rows = list(self._query("SELECT acked_seq FROM links WHERE proxy_id = %s", (proxy_id,)))
        return None if not rows else int(rows[0][0])

    def links(self) -> dict[str, int]:
        """Every proxy's last acknowledged batch C{seq}."""
        return {p: int(s) for p, s in self._query("SELECT proxy_id, acked_seq FROM links", ())}

    def count(self) -> int:
        """How many events (of every kind) are stored."""
        ((n,),) = self._query("SELECT count(*) FROM events", ())
        return int(n)

    def sql(self) -> PgSql:
        """This store's connection for the key, budget, limit and grant books
        (shared with its queries: one thread at a time)."""
        return PgSql(self)

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        self._drop()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _safe_url(url: str) -> str:
    """C{url} without its password, for messages."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{head}://{user}@{host}"
