"""The event store: L{Store}, the back-end interface, and L{EventStore}, SQLite.

L{Store} holds what every back end shares: the query layer (filters,
C{events}, C{report}) written once over a few dialect hooks, and the row
conversion below. L{EventStore} is the SQLite back end, shared by the
collector and the proxy's embedded mode; C{_pgstore.PgEventStore} is the
PostgreSQL one (C{open_store} in C{_open} picks one from a C{--db} value).

L{EventStore} is synchronous and free of Twisted: one instance belongs to one
thread at a time (the collector's writer thread, its reader thread, the
proxy's embedded-store thread, or the C{llmobserve} command). The file is in
WAL mode, so readers never block the writer.

Every event field of DESIGN.md is kept. The common scalars have columns (and
the context labels and token counts are copied into columns of their own for
filtering and reports); C{usage}, C{context}, C{graphql}, C{price_ref} and
C{flags} are JSON; any other key, or a known key whose value does not fit its
column, goes into the C{extra} JSON column. Reading an event back merges all
of them into the map that was written. Rows are deduplicated on C{id}.

Writing costs CPU in the thread that stores (the proxy's own, in embedded
mode), so the common event takes a fast path: C{orjson} for the JSON columns
(compact, valid JSON, UTF-8 rather than C{\\u} escapes: files written by the
previous stdlib encoder read the same), column values gathered with C{map}
and checked with set operations, bools bound as ints (sqlite3 sends a bool
through its slow adapter lookup, and a None too: rows leave out their
trailing NULLs, see C{_ROW_COLUMNS}). Anything unusual goes the careful way,
which gives the same row. The schema is unchanged (version 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
import orjson

from llmobserve.events import MAX_EVENT_DEPTH, nested_deeper_than
from llmobserve.events.fields import EVENT_FIELDS

from ._keys import KeyStore
from ._sql import SqlConnection, SQLiteSql

if TYPE_CHECKING:
    from ._budgets import SqlBudgetBook

__all__ = [
    "CALL_FIELDS",
    "FILTERS",
    "GROUPS",
    "NOT_FORWARDED",
    "SCHEMA_VERSION",
    "EventStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
]

SCHEMA_VERSION: Final = 1
_PAGE_SIZE: Final = 16384

#: Top-level scalar event fields with a column of the same name, and the
#: SQLite type each column holds.
_SCALARS: Final[dict[str, str]] = {
    "kind": "TEXT",
    "ts": "REAL",
    "duration_ms": "REAL",
    "ttfb_ms": "REAL",
    "overhead_ms": "REAL",
    "method": "TEXT",
    "host": "TEXT",
    "path": "TEXT",
    "status": "INTEGER",
    "outcome": "TEXT",
    "provider": "TEXT",
    "endpoint": "TEXT",
    "model": "TEXT",
    "streamed": "INTEGER",
    "usage_source": "TEXT",
    "cost_usd": "REAL",
    "request_bytes": "INTEGER",
    "response_bytes": "INTEGER",
    "parse_error": "TEXT",
    "dropped": "INTEGER",
}

#: Top-level fields stored as JSON text (maps and lists).
_JSON_FIELDS: Final = ("usage", "context", "graphql", "price_ref", "flags")

#: Context labels copied into columns: column name -> context key.
_CONTEXT_COLUMNS: Final = (
    "run_id",
    "span_id",
    "parent_span_id",
    "section",
    "section_path",
    "customer_id",
    "tenant_id",
)

#: Usage counts copied into columns for the report's sums.
_TOKEN_COLUMNS: Final = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)

#: The DESIGN.md event fields: a C{call} event read back always has all of
#: them (C{null} where unknown), so C{cost_usd: null} is never lost.
CALL_FIELDS: Final = EVENT_FIELDS

#: Filter names accepted by L{EventStore.events} and L{EventStore.report}
#: (and the HTTP API and the command line), and the column each one tests.
FILTERS: Final[dict[str, str]] = {
    "provider": "provider",
    "model": "model",
    "endpoint": "endpoint",
    "customer": "customer_id",
    "tenant": "tenant_id",
    "section": "section",
    "section_path": "section_path",
    "run": "run_id",
    "outcome": "outcome",
    "kind": "kind",
    "host": "host",
    # a key's project (DESIGN.md "A shared deployment"): not a column, the
    # table is unchanged; kept in the extra JSON like any newer field
    "project": "json_extract(extra, '$.project')",
    "status": "status",
    "usage_source": "usage_source",
}

#: Outcomes of calls the proxy answered itself, nothing forwarded: a report
#: leaves them out of its call counts (the command line shows them on a
#: line of their own).
NOT_FORWARDED: Final = ("refused", "proxy_error", "budget_refused")

#: Report grouping names and the SQL expression each groups on.
GROUPS: Final[dict[str, str]] = {
    "provider": "provider",
    "model": "model",
    "endpoint": "endpoint",
    "customer": "customer_id",
    "tenant": "tenant_id",
    "section": "section",
    "section_path": "section_path",
    "run": "run_id",
    "host": "host",
    "outcome": "outcome",
    "project": "json_extract(extra, '$.project')",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00Z', ts, 'unixepoch')",
}

_COLUMNS: Final = (
    "id",
    *_SCALARS,
    *_JSON_FIELDS,
    *_CONTEXT_COLUMNS,
    *_TOKEN_COLUMNS,
    "extra",
)
_KNOWN_KEYS: Final = frozenset(("id", *_SCALARS, *_JSON_FIELDS))
_SCALAR_NAMES: Final = tuple(_SCALARS)
_INT64: Final = 2**63

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY NOT NULL,
    {", ".join(f"{name} {kind}" for name, kind in _SCALARS.items())},
    {", ".join(f"{name} TEXT" for name in _JSON_FIELDS)},
    {", ".join(f"{name} TEXT" for name in _CONTEXT_COLUMNS)},
    {", ".join(f"{name} INTEGER" for name in _TOKEN_COLUMNS)},
    extra TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS links (
    proxy_id TEXT PRIMARY KEY NOT NULL,
    acked_seq INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""

#: Indexes made on every open when missing (no schema change): the
#: dashboard reads a run's events, and the reasons calls had no price,
#: without a scan of the whole table. Both are partial (rows with a run, calls
#: without a price): an ordinary priced call without a run costs no write.
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS events_run ON events (run_id) WHERE run_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_unpriced ON events (kind, ts) WHERE cost_usd IS NULL",
)

_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM events"

#: Rows are written in their own column order: the columns every call event
#: fills first, then those it mostly leaves NULL, the likeliest to be set
#: first. A row ends at its last non-NULL value (L{_trimmed}) and is written
#: with the statement naming just its columns: sqlite3 binds a None through
#: its adapter lookup (~0.2 us each, 8.5 us for a row of 39 against 1.2 for
#: 39 ints), so the 13 NULLs of an ordinary call row cost more than its 26
#: values (6.9 us a row in all, 3.8 without them). The table is unchanged.
_TAIL_SCALARS: Final = ("parse_error", "dropped")
_HEAD_SCALARS: Final = tuple(n for n in _SCALAR_NAMES if n not in _TAIL_SCALARS)
_HEAD_JSON: Final = ("usage", "context", "price_ref", "flags")
_TOKEN_ORDER: Final = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
)
_LABEL_ORDER: Final = (
    "customer_id",
    "section",
    "section_path",
    "tenant_id",
    "run_id",
    "span_id",
    "parent_span_id",
)
_ROW_COLUMNS: Final = (
    "id",
    *_HEAD_SCALARS,
    *_HEAD_JSON,
    "extra",
    *_TOKEN_ORDER,
    *_LABEL_ORDER,
    "graphql",
    *_TAIL_SCALARS,
)
#: The columns before the input token count are in every row, NULL or not.
_MIN_ROW: Final = _ROW_COLUMNS.index("input_tokens")
_INSERTS: Final = {
    n: f"INSERT OR IGNORE INTO events ({', '.join(_ROW_COLUMNS[:n])}) VALUES ({', '.join('?' * n)})"
    for n in range(_MIN_ROW, len(_ROW_COLUMNS) + 1)
}


class StoreError(Exception):
    """A bad query (unknown grouping or filter) or an unusable store file."""


class StoreUnsupported(StoreError):
    """What this back end does not offer yet (the dashboard's own queries
    are SQLite's alone for now)."""


def sqlite_only(store: Store, what: str) -> EventStore:
    """C{store} as the SQLite store C{what} needs, or L{StoreUnsupported}."""
    if isinstance(store, EventStore):
        return store
    raise StoreUnsupported(f"{what} needs the SQLite store for now (not yet on PostgreSQL)")


class StoreUnavailable(StoreError):
    """The store's server cannot be reached now (PostgreSQL); try again later."""


class _TooDeep(ValueError):
    """An event nests deeper than L{MAX_EVENT_DEPTH}: it is stored as rejected."""


#: A field of the event is one level below the event map.
_FIELD_DEPTH: Final = MAX_EVENT_DEPTH - 1


def _jsonable(value: Any) -> Any:
    """Turn msgpack-decoded values JSON cannot hold into ones it can."""
    if isinstance(value, Mapping):
        return {
            (k if isinstance(k, str) else _jsonable_key(k)): _jsonable(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _jsonable_key(key: Any) -> str:
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode("utf-8", "replace")
    return str(key)


# The stdlib encoder is the fallback for what orjson refuses (bytes, non-str
# keys, integers beyond 64 bits, lone surrogates): after _jsonable it writes
# them as the reader expects (a 2**70 stays an exact integer).
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_orjson_dumps = orjson.dumps


def _dumps(value: Any, depth: int = _FIELD_DEPTH) -> str:
    """Compact JSON text; non-finite floats become C{null}.

    orjson writes the same compact form as the stdlib (no spaces, keys in
    insertion order) but UTF-8 rather than C{\\uXXXX} escapes; both are
    valid JSON and read back equal.

    @param depth: the deepest nesting allowed. Each level costs at least two
        characters of JSON, so only a text that long can be too deep and is
        walked: an ordinary field is never walked.
    @raise _TooDeep: C{value} nests deeper than C{depth}.
    """
    try:
        text: str = _orjson_dumps(value).decode()
    except TypeError:
        # orjson refuses this value (or its 254th level): the stdlib
        # encoder recurses, so look before it does
        if nested_deeper_than(value, depth):
            raise _TooDeep(f"nested deeper than {MAX_EVENT_DEPTH} levels") from None
        return _encode(_jsonable(value))
    if len(text) >= 2 * (depth + 1) and nested_deeper_than(value, depth):
        raise _TooDeep(f"nested deeper than {MAX_EVENT_DEPTH} levels")
    return text


#: orjson reads integers beyond 64 bits as floats: text with such a number
#: (20 or more digits in a row) is read by the stdlib instead, exactly.
_LONG_DIGITS: Final = re.compile(r"\d{20}")
_orjson_loads = orjson.loads


def _loads(text: str) -> Any:
    if _LONG_DIGITS.search(text) is None:
        try:
            return _orjson_loads(text)
        except orjson.JSONDecodeError:
            pass  # NaN literals and the like: the stdlib's leniency
    return json.loads(text)


def _synthetic_id(event: Mapping[str, Any]) -> str:
    """A stable id for an event that came without one, so resends still dedupe."""
    digest = hashlib.sha256(
        _dumps(dict(sorted(event.items(), key=lambda kv: str(kv[0]))), MAX_EVENT_DEPTH).encode()
    )
    return "noid-" + digest.hexdigest()[:32]


def _row(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """The row for one event, whatever it holds (the careful path)."""
    extra: dict[str, Any] = {}
    event_id = event.get("id")
    if type(event_id) is not str or not event_id:
        if "id" in event:
            extra["id"] = event_id
        event_id = _synthetic_id(event)
    scalars: dict[str, Any] = {}
    for name in _SCALAR_NAMES:
        value = event.get(name)
        t = type(value)
        # whether the value fits its column as is
        if value is None or t is str or (t is int and -_INT64 <= value < _INT64):
            scalars[name] = value
        elif t is float:
            # NaN and infinities are stored as NULL (JSON has no word for them)
            scalars[name] = value if math.isfinite(value) else None
        elif t is bool:
            scalars[name] = int(value)  # sqlite3 binds a bool through its slow adapter path
        else:
            scalars[name] = None
            extra[name] = value
    if scalars["kind"] is None and "kind" not in extra:
        scalars["kind"] = "call"
    texts = {
        name: None if event.get(name) is None else _dumps(event[name]) for name in _JSON_FIELDS
    }
    context = event.get("context")
    if not isinstance(context, Mapping):
        context = {}
    # Spans may carry their labels at the top level rather than in context.
    labels = [context.get(name, event.get(name)) for name in _LABEL_ORDER]
    usage = event.get("usage")
    if not isinstance(usage, Mapping):
        usage = {}
    counts = [usage.get(name) for name in _TOKEN_ORDER]
    for key, value in event.items():
        if key not in _KNOWN_KEYS:
            extra[key if isinstance(key, str) else _jsonable_key(key)] = value
    return _trimmed(
        (
            event_id,
            *(scalars[name] for name in _HEAD_SCALARS),
            *(texts[name] for name in _HEAD_JSON),
            _dumps(extra, MAX_EVENT_DEPTH) if extra else None,
            *(c if type(c) is int and -_INT64 <= c < _INT64 else None for c in counts),
            *(label if type(label) is str else None for label in labels),
            texts["graphql"],
            *(scalars[name] for name in _TAIL_SCALARS),
        )
    )


#: Where the token counts end: what comes after (labels, GraphQL, parse
#: error, gap count) is NULL in most rows, which one tuple compare finds.
_AFTER_TOKENS: Final = _MIN_ROW + len(_TOKEN_ORDER)
_NULLS_AFTER_TOKENS: Final = (None,) * (len(_ROW_COLUMNS) - _AFTER_TOKENS)


def _trimmed(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """C{row} without its trailing NULLs (those after L{_MIN_ROW} columns)."""
    n = len(row)
    if row[_AFTER_TOKENS:] == _NULLS_AFTER_TOKENS:
        n = _AFTER_TOKENS
    while n > _MIN_ROW and row[n - 1] is None:
        n -= 1
    return row if n == len(row) else row[:n]


#: Types a scalar column takes as is in the fast path (bools are turned into
#: ints; an integer beyond 64 bits makes sqlite3 raise OverflowError, which
#: sends the whole batch down the careful path).
_PLAIN: Final = frozenset((type(None), str, int, float, bool))
_LABEL_TYPES: Final = frozenset((type(None), str))
_COUNT_TYPES: Final = frozenset((type(None), int))
_INFINITIES: Final = frozenset((math.inf, -math.inf))
#: The scalars in the order the fast path reads them: the row's head, then its tail.
_SCALAR_READS: Final = (*_HEAD_SCALARS, *_TAIL_SCALARS)
_N_HEAD_SCALARS: Final = len(_HEAD_SCALARS)
_KIND: Final = _SCALAR_READS.index("kind")
_STREAMED: Final = _SCALAR_READS.index("streamed")
_LABEL_KEYS: Final = frozenset(_CONTEXT_COLUMNS)
_NO_LABELS: Final = (None,) * len(_CONTEXT_COLUMNS)
_NO_COUNTS: Final = (None,) * len(_TOKEN_COLUMNS)


def _columns_and_json(
    value: Any, columns: tuple[str, ...], empty: tuple[Any, ...], types: frozenset[Any]
) -> tuple[tuple[Any, ...], str | None] | None:
    """For L{_fast_row}: a map's C{columns} values and the map as JSON.

    C{(empty, None)} for None; None (take the careful path) for anything but
    a plain dict whose column values are all of C{types}.
    """
    if value is None:
        return empty, None
    if type(value) is not dict:
        return None
    if not value:
        return empty, "{}"
    values = tuple(map(value.get, columns))
    if not types.issuperset(map(type, values)):
        return None
    return values, _dumps(value)


#: JSON text of values that repeat from event to event (price references,
#: the proxy id in C{extra}): remembered rather than encoded each time.
#: Bounded; plain dicts, so reads and writes are safe from any thread.
_STRINGS: dict[str, str] = {}
_ONE_KEY: dict[tuple[str, str], str] = {}
_REMEMBER: Final = 1024


def _remembered_json(memo: dict[Any, str], key: Any, value: Any) -> str:
    text = memo.get(key)
    if text is None:
        text = _dumps(value)
        if len(memo) >= _REMEMBER:
            memo.clear()
        memo[key] = text
    return text


def _string_json(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is str:
        return _remembered_json(_STRINGS, value, value)
    return _dumps(value)


def _list_json(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is list and not value:
        return "[]"
    return _dumps(value)


def _fast_row(event: Any) -> tuple[Any, ...] | None:
    """L{_row} for the ordinary event (what a proxy sends), or C{None}.

    C{None} means "use L{_row}": anything unusual (no id, a value of a type
    or size a column cannot hold as is, a non-dict, labels at the top level,
    an infinity, a float C{kind}) takes the careful path. Both store the
    same for the events this one accepts, and give the same row but for a
    NaN, which this one leaves to SQLite (it binds a NaN as NULL, where the
    careful row holds None). Lookups go through C{map} over the name tuples
    and the checks are set operations, so the per-field work runs in C.
    """
    if type(event) is not dict:
        return None
    get = event.get
    event_id = get("id")
    if type(event_id) is not str or not event_id:
        return None
    scalars = tuple(map(get, _SCALAR_READS))
    if not _PLAIN.issuperset(map(type, scalars)) or not _INFINITIES.isdisjoint(scalars):
        return None
    if type(scalars[_KIND]) is float:
        return None  # a NaN kind is bound as NULL, where the careful path says "call"
    if scalars[_KIND] is None or type(scalars[_STREAMED]) is bool:
        fixed = list(scalars)
        if fixed[_KIND] is None:
            fixed[_KIND] = "call"
        streamed = fixed[_STREAMED]
        if type(streamed) is bool:
            fixed[_STREAMED] = int(streamed)
        scalars = tuple(fixed)
    if bool in map(type, scalars):
        return None  # a bool in another column: rare, and _row converts it
    keys = event.keys()
    if not _LABEL_KEYS.isdisjoint(keys):
        return None  # span labels at the top level
    found = _columns_and_json(get("context"), _LABEL_ORDER, _NO_LABELS, _LABEL_TYPES)
    if found is None:
        return None
    labels, context_json = found
    found = _columns_and_json(get("usage"), _TOKEN_ORDER, _NO_COUNTS, _COUNT_TYPES)
    if found is None:
        return None
    counts, usage_json = found
    graphql = get("graphql")
    price_ref = get("price_ref")
    flags = get("flags")
    unknown = keys - _KNOWN_KEYS
    if not unknown:
        extra = None
    elif len(unknown) == 1:
        (key,) = unknown
        value = event[key]
        if type(key) is str and type(value) is str:
            extra = _remembered_json(_ONE_KEY, (key, value), {key: value})
        else:
            extra = _dumps({key: value}, MAX_EVENT_DEPTH)
    else:
        extra = _dumps({k: v for k, v in event.items() if k in unknown}, MAX_EVENT_DEPTH)
    return _trimmed(
        (
            event_id,
            *scalars[:_N_HEAD_SCALARS],
            usage_json,
            context_json,
            _string_json(price_ref),
            _list_json(flags),
            extra,
            *counts,
            *labels,
            None if graphql is None else _dumps(graphql),
            *scalars[_N_HEAD_SCALARS:],
        )
    )


def _rows(
    events: Sequence[Mapping[str, Any]],
    rejected: list[tuple[str, str]] | None = None,
    careful: bool = False,
) -> list[tuple[Any, ...]]:
    """The rows for C{events}, one each, in order.

    An event that cannot be made into a row (nested too deep, or anything
    else that raises) becomes a rejected record (L{_rejected_row}) rather
    than failing the batch it came in: the others are stored with it.

    @param rejected: if given, gets C{(id, reason)} for each rejected event.
    @param careful: every row the careful way (L{_row}).
    """
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for event in events:
        try:
            row = None if careful else _fast_row(event)
            append(_row(event) if row is None else row)
        except Exception as e:  # whatever one event does, it fails alone
            reason = str(e) if isinstance(e, _TooDeep) else f"{type(e).__name__}: {e}"[:200]
            row = _rejected_row(event, reason)
            if rejected is not None:
                rejected.append((row[0], reason))
            append(row)
    return rows


def _rejected_row(event: Any, reason: str) -> tuple[Any, ...]:
    """The row of a rejected record standing for an event that cannot be stored.

    C{kind: rejected}, the event's C{id} (so a resend deduplicates) or one
    derived from its bytes, its C{ts} if it had a usable one, and C{reason}.
    """
    fields: Mapping[Any, Any] = event if isinstance(event, Mapping) else {}
    get = fields.get
    event_id = get("id")
    if type(event_id) is not str or not event_id:
        try:
            packed = msgpack.packb(event, use_bin_type=True)
            event_id = "rejected-" + hashlib.sha256(packed).hexdigest()[:32]
        except Exception:  # even msgpack cannot: no stable id to give it
            event_id = "rejected-" + uuid.uuid4().hex
    record: dict[str, Any] = {"id": event_id, "kind": "rejected", "reason": reason}
    ts = get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        if math.isfinite(ts) and -_INT64 <= ts < _INT64:
            record["ts"] = ts
    return _row(record)


_N_SCALARS: Final = len(_SCALARS)
_JSON_START: Final = 1 + _N_SCALARS
_EXTRA_INDEX: Final = len(_COLUMNS) - 1


def _event(row: Sequence[Any]) -> dict[str, Any]:
    """The event map a row was made from."""
    kind = row[1]
    out: dict[str, Any] = {"id": row[0]}
    full = kind == "call"
    if full:
        for name in CALL_FIELDS[1:]:
            out[name] = None
    for i, name in enumerate(_SCALAR_NAMES, start=1):
        value = row[i]
        if value is not None or (full and name in out):
            out[name] = value
    streamed = out.get("streamed")
    if streamed is not None:
        out["streamed"] = bool(streamed)
    for i, name in enumerate(_JSON_FIELDS, start=_JSON_START):
        text = row[i]
        if text is not None:
            out[name] = _loads(text)
    extra = row[_EXTRA_INDEX]
    if extra is not None:
        out.update(_loads(extra))
    for name in list(out):
        if out[name] is None and not (full and name in CALL_FIELDS):
            del out[name]
    return out


def _retry_locked(action: Callable[[], object], attempts: int = 50) -> None:
    """Run C{action}, retrying while another connection holds the new file.

    Two connections opening a brand-new store at once (the collector's
    writer and reader threads) can see "database is locked" from the WAL
    switch or the schema creation without SQLite's busy handler being
    consulted; a short retry resolves it.
    """
    for attempt in range(attempts):
        try:
            action()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.02)


class Store:
    """What every event store back end offers; the query layer is shared.

    A back end implements the storage methods (L{insert}, L{insert_rows},
    L{acked_seq}, L{links}, L{count}, L{close}) and L{_query}, and sets the
    dialect hooks below; L{events} and L{report} are written once here over
    them, so both back ends answer every C{/api/*} query alike. One instance
    belongs to one thread at a time. A new query (budgets, API keys, the
    dashboard's) is written here the same way, in portable SQL with
    C{self._P} placeholders, or as a method each back end implements.
    """

    #: The placeholder of the driver's parameter style.
    _P: str = "?"
    #: The LIMIT value meaning "no limit".
    _NO_LIMIT: Any = -1
    #: The SQL expression of each L{GROUPS} name.
    _GROUPS: Mapping[str, str] = GROUPS
    #: How L{events} orders rows: by C{ts}, then arrival (and newest first).
    _EVENT_ORDER: str = "ts, rowid"
    _EVENT_ORDER_DESC: str = "ts DESC, rowid DESC"
    #: The SQL expression of each L{FILTERS} name.
    _FILTERS: Mapping[str, str] = FILTERS
    #: The report's cost sum (it must not fail past the float range).
    _COST_SUM: str = "sum(cost_usd)"

    #: C{(id, reason)} of each event the last L{insert} stored as rejected
    last_rejected: list[tuple[str, str]]

    _keys: KeyStore | None = None

    def sql(self) -> SqlConnection:
        """The store's connection for the key, budget, limit and grant books."""
        raise NotImplementedError

    @property
    def keys(self) -> KeyStore:
        """The projects and API keys kept in this store (L{KeyStore}; on
        SQLite its tables are created on first use)."""
        if self._keys is None:
            self._keys = KeyStore(self.sql())
        return self._keys

    def budget_book(self) -> SqlBudgetBook:
        """The budgets and rate limits kept in this store, on its own
        connection (closing the book leaves the store open)."""
        from ._budgets import SqlBudgetBook

        return SqlBudgetBook(self.sql())

    def _query(self, sql: str, params: Sequence[Any]) -> Iterable[Sequence[Any]]:
        """The rows of one read-only query."""
        raise NotImplementedError

    def _group_order(self, index: int, expr: str) -> str:
        """The ORDER BY term of report group C{index} (the SQL C{expr})."""
        return f"g{index}"

    def _change(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement in its own transaction; the rows it changed."""
        raise NotImplementedError

    def drop_before(self, cutoff: float, limit: int = 10_000) -> int:
        """Delete up to C{limit} events with C{ts < cutoff} (retention).

        One short transaction over the C{ts} index, so inserts are not held
        up for long: call again while it returns C{limit}. Events without a
        C{ts} are kept. Returns how many were deleted.
        """
        arrival = self._EVENT_ORDER.rsplit(",", 1)[-1].strip()
        p = self._P
        sql = (
            f"DELETE FROM events WHERE {arrival} IN "
            f"(SELECT {arrival} FROM events WHERE ts < {p} LIMIT {p})"
        )
        return self._change(sql, (cutoff, max(1, limit)))

    def insert(
        self,
        events: Iterable[Mapping[str, Any]],
        acked_seqs: Mapping[str, int] | None = None,
        now: float | None = None,
    ) -> int:
        """Store events in one transaction; return how many were new (see L{EventStore})."""
        raise NotImplementedError

    def insert_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        *,
        pause: Callable[[], None] | None = None,
        chunk: int = 8,
    ) -> int:
        """Store rows made by L{EventStore.row_for}; return how many were new."""
        raise NotImplementedError

    def acked_seq(self, proxy_id: str) -> int | None:
        """The last batch C{seq} acknowledged to this proxy, if any."""
        raise NotImplementedError

    def links(self) -> dict[str, int]:
        """Every proxy's last acknowledged batch C{seq}."""
        raise NotImplementedError

    def count(self) -> int:
        """How many events (of every kind) are stored."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        raise NotImplementedError

    # -- what the dashboard's queries (_insights) write their SQL with -------

    @property
    def placeholder(self) -> str:
        """The driver's parameter placeholder (C{?} or C{%s})."""
        return self._P

    def cost_sum(self, expr: str = "cost_usd") -> str:
        """The SQL sum of a cost expression that does not fail past the
        float range (SQLite gives infinity; PostgreSQL sums it as numeric)."""
        return self._COST_SUM.replace("cost_usd", f"({expr})")

    def group_sql(self, name: str) -> str:
        """The SQL expression of the L{GROUPS} name C{name}."""
        return self._GROUPS[name]

    def text_order(self, expr: str) -> str:
        """An ORDER BY term putting text in byte order, NULL first (SQLite's
        own order, whatever the database's collation)."""
        return expr

    def rollup_answers(self, by: Sequence[str], filters: Mapping[str, str | None]) -> bool:
        """Whether L{report} answers these groups and filters from sums the
        store keeps (PostgreSQL's rollup tables) rather than the events."""
        return False

    def summary_rollup(
        self, since: float | None, until: float | None, top_reasons: int
    ) -> tuple[Sequence[Any], dict[int, int], list[tuple[Any, int]]] | None:
        """An unfiltered window's summary from sums the store keeps
        (PostgreSQL's tables), or None to read the events: the totals row
        (L{CallSums.add_row<llmobserve.collector._rollup.CallSums.add_row>}'s
        order), calls per latency histogram bucket, and the C{top_reasons}
        commonest C{price_ref} texts of unpriced forwarded calls."""
        return None

    def event(self, event_id: str) -> dict[str, Any] | None:
        """The stored event with this C{id}, or None."""
        rows = list(self._query(f"{_SELECT} WHERE id = {self._P}", (event_id,)))
        return _event(rows[0]) if rows else None

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only query (for the dashboard's summaries in
        L{llmobserve.collector._insights}), with L{placeholder} parameters."""
        return [tuple(row) for row in self._query(sql, params)]

    def where(
        self, filters: Mapping[str, str | None], since: float | None, until: float | None
    ) -> tuple[str, list[Any]]:
        """The C{WHERE} clause (or C{""}) and parameters L{events} and
        L{report} use for these filters and bounds.

        @raise StoreError: an unknown filter name.
        """
        return self._where(filters, since, until)

    def _where(
        self,
        filters: Mapping[str, str | None],
        since: float | None,
        until: float | None,
        columns: Mapping[str, str] | None = None,
    ) -> tuple[str, list[Any]]:
        """The C{WHERE} clause and parameters of C{filters} and bounds.

        @param columns: each filter's SQL (default: the dialect's L{_FILTERS}).
        """
        clauses: list[str] = []
        params: list[Any] = []
        for name, value in filters.items():
            if value is None:
                continue
            column = (self._FILTERS if columns is None else columns).get(name)
            if column is None:
                raise StoreError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")
            if name == "section_path":
                # a section path also selects everything nested under it
                p = self._P
                clauses.append(f"(section_path = {p} OR substr(section_path, 1, {p}) = {p})")
                params += [value, len(value) + 1, value + "/"]
            else:
                clauses.append(f"{column} = {self._P}")
                params.append(value)
        if since is not None:
            clauses.append(f"ts >= {self._P}")
            params.append(since)
        if until is not None:
            clauses.append(f"ts < {self._P}")
            params.append(until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def events(
        self,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = 100,
        offset: int = 0,
        *,
        newest_first: bool = False,
        **filters: str | None,
    ) -> list[dict[str, Any]]:
        """Stored events, oldest first (by C{ts}, then arrival), as event maps.

        @param newest_first: the other way round (the dashboard's calls list).
        @param since: only events with C{ts >= since} (unix seconds).
        @param until: only events with C{ts < until}.
        @param limit: at most this many (C{None}: all).
        @param filters: exact matches, named as in L{FILTERS} (C{customer},
            C{run}, ...); C{section_path} also matches nested paths.
        @raise StoreError: an unknown filter name.
        """
        where, params = self._where(filters, since, until)
        p = self._P
        order = self._EVENT_ORDER_DESC if newest_first else self._EVENT_ORDER
        sql = f"{_SELECT}{where} ORDER BY {order} LIMIT {p} OFFSET {p}"
        params += [self._NO_LIMIT if limit is None else max(0, limit), max(0, offset)]
        return [_event(row) for row in self._query(sql, params)]

    def report(
        self,
        by: Sequence[str] = ("provider", "model"),
        since: float | None = None,
        until: float | None = None,
        **filters: str | None,
    ) -> list[dict[str, Any]]:
        """Call counts, cost and token sums grouped by C{by}.

        Rows come most expensive first; with a C{day} or C{hour} grouping,
        in time order first.

        Only C{call} events count (spans and gaps are not calls), and only
        calls that were forwarded: outcomes in L{NOT_FORWARDED} (the proxy
        answered itself) are left out unless the C{outcome} filter asks for
        them. C{cost_usd}
        sums the priced calls and is C{null} when none was priced;
        C{unpriced_calls} says how many had no known price, so an unknown
        price never reads as zero.

        @param by: names from L{GROUPS}; empty for one grand total row.
        @raise StoreError: an unknown grouping or filter name.
        """
        groups = self._report_groups(by)
        where, params = self._where({**filters, "kind": "call"}, since, until)
        if filters.get("outcome") is None:
            marks = ", ".join([self._P] * len(NOT_FORWARDED))
            where += f" AND coalesce(outcome, '') NOT IN ({marks})"
            params += list(NOT_FORWARDED)
        select = [f"{self._GROUPS[g]} AS g{i}" for i, g in enumerate(groups)]
        select += [
            "count(*)",
            self._COST_SUM,
            "sum(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END)",
            *(f"sum({t})" for t in _TOKEN_COLUMNS),
            self._COST_SUM.replace(
                "cost_usd", "CASE WHEN usage_source = 'estimated' THEN cost_usd END"
            ),
            "sum(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)",
        ]
        sql = f"SELECT {', '.join(select)} FROM events{where}"
        if groups:
            sql += f" GROUP BY {', '.join(f'g{i}' for i in range(len(groups)))}"
        order = self._report_order(groups, self._GROUPS, self._COST_SUM, "count(*)")
        sql += f" ORDER BY {order}"
        return self._report_rows(groups, self._query(sql, params))

    def _report_groups(self, by: Sequence[str]) -> list[str]:
        """L{report}'s groups: C{by} without repeats, each checked."""
        groups: list[str] = []
        for name in by:
            if name not in self._GROUPS:
                raise StoreError(f"unknown grouping {name!r}; known: {', '.join(GROUPS)}")
            if name not in groups:
                groups.append(name)
        return groups

    def _report_order(
        self, groups: Sequence[str], exprs: Mapping[str, str], cost: str, calls: str
    ) -> str:
        """L{report}'s ORDER BY terms, given its group expressions and its
        cost and call count sums."""

        def key(index: int, name: str) -> str:
            return self._group_order(index, exprs[name])

        # Time groups read best in time order; the rest, costliest first.
        order = [key(i, g) for i, g in enumerate(groups) if g in ("day", "hour")]
        order += [f"coalesce({cost}, 0) DESC", f"{calls} DESC"]
        order += [key(i, g) for i, g in enumerate(groups) if g not in ("day", "hour")]
        return ", ".join(order)

    @staticmethod
    def _report_rows(groups: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        """L{report}'s rows from result rows: the groups, then count, cost,
        unpriced calls, the token sums, estimated cost and estimated calls."""
        out: list[dict[str, Any]] = []
        n = len(groups)
        for row in rows:
            item: dict[str, Any] = {g: row[i] for i, g in enumerate(groups)}
            item["calls"] = int(row[n] or 0)
            cost = row[n + 1]
            # sums of many small floats carry noise in the last digits
            # (a sum past the float range has no JSON spelling: unknown)
            if cost is not None:
                cost = float(cost)
            item["cost_usd"] = None if cost is None or not math.isfinite(cost) else round(cost, 10)
            # int(): PostgreSQL sums integers as numeric
            item["unpriced_calls"] = int(row[n + 2] or 0)
            for j, t in enumerate(_TOKEN_COLUMNS):
                item[t] = int(row[n + 3 + j] or 0)
            estimated = row[n + 3 + len(_TOKEN_COLUMNS)]
            if estimated is not None:
                estimated = float(estimated)
            item["estimated_cost_usd"] = (
                None if estimated is None or not math.isfinite(estimated) else round(estimated, 10)
            )
            item["estimated_calls"] = int(row[n + 4 + len(_TOKEN_COLUMNS)] or 0)
            out.append(item)
        return out


class EventStore(Store):
    """Events in one SQLite file, synchronous, for use by one thread at a time.

    @param path: the database file; its directory is created if missing.
    @param synchronous: SQLite's C{synchronous} setting. C{FULL} (the default)
        makes every commit durable before L{insert} returns, which is what a
        collector's acknowledgement promises.
    @param check_same_thread: passed to L{sqlite3.connect}. Off by default, so
        a store opened in one thread may be handed to another (thread pools
        may do that); it must still never be used by two threads at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        check_same_thread: bool = False,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreError(f"unknown synchronous mode {synchronous!r}")
        self.path = Path(path)
        #: C{(id, reason)} of each event the last L{insert} stored as rejected
        self.last_rejected: list[tuple[str, str]] = []
        self._keys: KeyStore | None = None
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(path),
                isolation_level=None,
                check_same_thread=check_same_thread,
                timeout=30.0,
            )
            # A new file gets 16 KiB pages (a no-op for an existing one): rows
            # are appended in batches, and bigger pages mean fewer page
            # writes per commit (-0.5 us of the writer's CPU a row).
            self._db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            _retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=OFF")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open event store {str(path)!r}: {e}") from e

    def _migrate(self) -> None:
        _retry_locked(self._migrate_once)

    def _migrate_once(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema {version} is newer than this llmobserve ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        present = {
            name
            for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
        for statement in _INDEXES:
            if statement.split()[5] not in present:
                self._db.execute(statement)

    def insert(
        self,
        events: Iterable[Mapping[str, Any]],
        acked_seqs: Mapping[str, int] | None = None,
        now: float | None = None,
    ) -> int:
        """Store events in one transaction; return how many were new.

        Events whose C{id} is already stored are ignored (that is the
        deduplication that makes resending safe). An event that cannot be
        stored (nested deeper than L{MAX_EVENT_DEPTH} levels, or anything
        else its conversion raises) is stored as a rejected record instead
        (C{kind: rejected}, its C{id}, C{ts} and the C{reason}), listed in
        L{last_rejected}; the other events of the batch are stored as usual.
        C{acked_seqs}, if given, records each proxy's last acknowledged
        batch C{seq} in the same transaction. When this returns, the
        transaction is committed.

        @param now: the time to record for C{acked_seqs} (unix seconds).
        """
        if not isinstance(events, list | tuple):
            events = list(events)
        rejected: list[tuple[str, str]] = []
        try:
            inserted = self._insert_rows(_rows(events, rejected), acked_seqs, now)
        except OverflowError:
            # an integer beyond 64 bits slipped through the fast path
            # (sqlite3 refuses it): start again the careful way
            rejected = []
            rows = _rows(events, rejected, careful=True)
            inserted = self._insert_rows(rows, acked_seqs, now)
        self.last_rejected = rejected
        return inserted

    #: The row L{insert} would write for an ordinary event, or None for one
    #: that needs the careful path: computed ahead of time, in any thread
    #: (the proxy's parse threads do it, so the store thread does not have
    #: to decode and convert each event again), then given to L{insert_rows}.
    row_for = staticmethod(_fast_row)

    #: The rows L{insert} would write for these events (careful where need be).
    rows_for = staticmethod(_rows)

    def insert_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        *,
        pause: Callable[[], None] | None = None,
        chunk: int = 8,
    ) -> int:
        """L{insert} for rows made by L{row_for}; returns how many were new.

        @param pause: called between two C{chunk}s of rows, inside the
            transaction: the proxy's embedded store lets the reactor, which
            shares its core, finish a turn there (SQLite work releases the
            GIL but not the CPU).
        @raise OverflowError: a row holds an integer beyond 64 bits (nothing
            was written): L{insert} the events instead.
        """
        return self._insert_rows(rows, None, None, pause, chunk)

    def _insert_rows(
        self,
        rows: Sequence[tuple[Any, ...]],
        acked_seqs: Mapping[str, int] | None,
        now: float | None,
        pause: Callable[[], None] | None = None,
        chunk: int = 0,
    ) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            step = chunk if pause is not None and chunk >= 1 else max(len(rows), 1)
            for start in range(0, len(rows), step):
                if start and pause is not None:
                    pause()
                # consecutive rows of one length share a statement (rows
                # keep their order: it breaks ties between equal timestamps)
                for n, same in groupby(rows[start : start + step], len):
                    db.executemany(_INSERTS[n], same)
            inserted = db.total_changes - before
            if acked_seqs:
                if now is None:
                    now = time.time()
                db.executemany(
                    "INSERT INTO links (proxy_id, acked_seq, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(proxy_id) DO UPDATE SET "
                    "acked_seq = excluded.acked_seq, updated_at = excluded.updated_at",
                    [(p, s, now) for p, s in acked_seqs.items()],
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return inserted

    def acked_seq(self, proxy_id: str) -> int | None:
        """The last batch C{seq} acknowledged to this proxy, if any."""
        row = self._db.execute(
            "SELECT acked_seq FROM links WHERE proxy_id = ?", (proxy_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def links(self) -> dict[str, int]:
        """Every proxy's last acknowledged batch C{seq}."""
        return {p: int(s) for p, s in self._db.execute("SELECT proxy_id, acked_seq FROM links")}

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """L{Store.read}: sqlite3's rows are tuples already."""
        return self._db.execute(sql, params).fetchall()

    def count(self) -> int:
        """How many events (of every kind) are stored."""
        (n,) = self._db.execute("SELECT count(*) FROM events").fetchone()
        return int(n)

    def _query(self, sql: str, params: Sequence[Any]) -> Iterable[Sequence[Any]]:
        return self._db.execute(sql, params)

    def _change(self, sql: str, params: Sequence[Any]) -> int:
        return int(self._db.execute(sql, params).rowcount)

    def sql(self) -> SqlConnection:
        """The file's connection for the key, budget, limit and grant books."""
        return SQLiteSql(self._db)

    def close(self) -> None:
        """Close the file; the store is unusable afterwards."""
        self._db.close()
