"""C{llmobserve budgets set|list|delete}, and the budgets lines of C{report}.

Budgets live in the store (C{--db}: a file, or a C{postgresql://}
database that collectors share); the proxy reads them from there or from
its collector (see C{docs/BUDGETS.md}). Importing this module does not
import Twisted.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

from llmobserve.collector import (
    SCOPE_FIELDS,
    Budget,
    BudgetError,
    RateLimit,
    RateLimitBook,
    SqlBudgetBook,
    SQLiteBudgetBook,
    StoreError,
    check_scope_provider,
    db_from_env,
    is_postgres_url,
    open_store,
)
from llmobserve.money import usd_fixed
from llmobserve.paths import default_db_path, no_store_message

__all__ = [
    "BadDefinition",
    "add_budgets_parser",
    "add_limits_parser",
    "budget_status",
    "budgets_of_collector",
    "run_budgets",
    "run_limits",
    "store_book",
    "write_budget_lines",
]


#: C{--db} of C{budgets} and C{limits}: the default is the one C{report} has
_DB_HELP = "store file or postgresql:// URL (default: $LLMOBSERVE_DB, else the proxy's own file)"


_T = TypeVar("_T")


class BadDefinition(BudgetError):
    """A budget or limit the command line's values cannot make (a negative
    limit, an unknown time zone): a usage error, exit status 2, as a value
    argparse refuses is."""


def _defined(make: Callable[[], _T]) -> _T:
    """C{make()}, its L{BudgetError} a L{BadDefinition} (called before the
    store is opened: a bad value leaves no new store behind)."""
    try:
        return make()
    except BudgetError as e:
        raise BadDefinition(str(e)) from None


def add_budgets_parser(sub: Any) -> None:
    """Add the C{budgets} subcommand and its C{set}, C{list}, C{delete}."""
    p = sub.add_parser(
        "budgets",
        help="define, list and delete spending budgets the proxy enforces",
        description=(
            "Budgets are kept in the store file; a running proxy on that file applies a "
            "change within 2 s. A 'block' budget makes the proxy answer 402 to a call "
            "whose worst-case cost could take its spend past the limit."
        ),
    )
    p.add_argument("--db", metavar="PATH|URL", help=_DB_HELP)
    _add_collector_options(p, "/api/budgets")
    bsub = p.add_subparsers(dest="budgets_command", metavar="ACTION", required=True)
    s = bsub.add_parser("set", help="create or replace a budget")
    s.add_argument("--name", required=True)
    s.add_argument("--limit-usd", required=True, type=float, metavar="AMOUNT")
    s.add_argument("--window", required=True, choices=("hour", "day", "month", "total"))
    s.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA zone of the window (UTC)")
    s.add_argument("--action", choices=("block", "warn"), default="block", help="default: block")
    s.add_argument(
        "--unpriced",
        choices=("allow", "block"),
        default="allow",
        help="a call with no known price: allow it, flagged (default), or block it",
    )
    s.add_argument(
        "--fail",
        choices=("closed", "open"),
        default="closed",
        help="while a proxy cannot reach its collector: refuse once its slice is spent "
        "(closed, default) or let calls through, flagged (open)",
    )
    _add_scope_options(s)
    lst = bsub.add_parser("list", help="every budget with its spend in the current window")
    lst.add_argument("--format", choices=("table", "json"), default="table")
    d = bsub.add_parser("delete", help="remove a budget")
    d.add_argument("name")
    for q in (s, lst, d):
        _add_where_options(q, "/api/budgets")


#: the help of each scope option (C{SCOPE_FIELDS} names them)
_SCOPE_HELP = {
    "customer": "only calls of this customer id",
    "tenant": "only calls of this tenant id",
    "section": "only calls in this section path or under it",
    "provider": "only calls to this provider id",
    "model": "only calls of this model or its dated snapshots",
    "project": "only calls made with a key of this project (shared deployments)",
}


def _add_scope_options(parser: Any) -> None:
    """C{--customer}, C{--tenant}, ...: one option per scope field."""
    for name in SCOPE_FIELDS:
        kind = _provider_id if name == "provider" else None
        parser.add_argument(f"--{name}", metavar="VALUE", type=kind, help=_SCOPE_HELP[name])


def _provider_id(value: str) -> str:
    """C{--provider}: a registry id, or a usage error naming the closest one."""
    try:
        check_scope_provider(value, "")  # argparse names the option
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _add_where_options(parser: Any, route: str) -> None:
    """The store and collector options again after the action (`budgets list
    --collector URL --key KEY`), shown in the action's own --help."""
    parser.add_argument("--db", metavar="PATH|URL", dest="db_sub", help=_DB_HELP)
    parser.add_argument(
        "--collector", metavar="URL", dest="collector_sub", help=f"a collector's HTTP API ({route})"
    )
    parser.add_argument(
        "--key",
        metavar="KEY",
        dest="key_sub",
        help="the API key for a collector that requires keys",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PEM",
        dest="ca_file_sub",
        help="extra CAs to trust for an https collector",
    )


def _add_collector_options(parser: Any, route: str) -> None:
    """C{--collector URL} (its C{route}), C{--key} and C{--ca-file}."""
    parser.add_argument("--collector", metavar="URL", help=f"a collector's HTTP API ({route})")
    parser.add_argument(
        "--key",
        metavar="KEY",
        help="an admin key (set, delete) or any key (list) for a collector that requires"
        " keys (default $LLMOBSERVE_API_KEY)",
    )
    parser.add_argument(
        "--ca-file", metavar="PEM", help="extra CAs to trust for an https collector"
    )


def _scope_args(args: argparse.Namespace) -> dict[str, str | None]:
    """The scope options given, by field name."""
    return {name: getattr(args, name) for name in SCOPE_FIELDS}


class _HTTPBook:
    """The budgets of a collector, through C{/api/budgets} (or its rate
    limits, through C{/api/limits}: L{_HTTPLimits})."""

    route = "/api/budgets"

    def __init__(self, url: str, key: str | None = None, ca_file: str | None = None) -> None:
        base = url if "://" in url else "http://" + url
        self._url = base.rstrip("/") + self.route
        self._key = key if key is not None else os.environ.get("LLMOBSERVE_API_KEY") or None
        self._tls = ssl.create_default_context()
        if ca_file is not None:  # a private CA, added to the system's
            self._tls.load_verify_locations(cafile=ca_file)

    def _call(self, method: str, path: str = "", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._key:
            req.add_header("Authorization", f"Bearer {self._key}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._tls) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except Exception:
                message = str(e)
            raise BudgetError(f"{self._url}: {message}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BudgetError(f"cannot use {self._url}: {e}") from None

    def set(self, budget: Budget) -> None:
        self._call("POST", body=budget.as_dict())

    def delete(self, name: str) -> bool:
        self._call("DELETE", "/" + urllib.parse.quote(name, safe=""))
        return True

    def status(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET")["budgets"]
        return rows

    def close(self) -> None:
        pass


class _HTTPLimits(_HTTPBook):
    """The rate limits of a collector, through C{/api/limits}."""

    route = "/api/limits"

    def set(self, limit: RateLimit) -> None:  # type: ignore[override]  # a limit, not a budget
        self._call("POST", body=limit.as_dict())

    def list(self) -> list[RateLimit]:
        rows = self._call("GET")["limits"]
        fields = set(RateLimit.__dataclass_fields__)
        return [RateLimit.from_dict({k: v for k, v in r.items() if k in fields}) for r in rows]


def add_limits_parser(sub: Any) -> None:
    """Add the C{limits} subcommand (calls or tokens per minute)."""
    p = sub.add_parser(
        "limits",
        help="define, list and delete calls-per-minute and tokens-per-minute limits",
        description=(
            "Rate limits are kept in the store beside budgets (a file, or a postgresql:// "
            "database, or a collector's); a running proxy on that file or collector "
            "applies a change within 2 s and answers 429 (with Retry-After) to a call "
            "past one."
        ),
    )
    p.add_argument("--db", metavar="PATH|URL", help=_DB_HELP)
    _add_collector_options(p, "/api/limits")
    lsub = p.add_subparsers(dest="limits_command", metavar="ACTION", required=True)
    s = lsub.add_parser("set", help="create or replace a limit")
    s.add_argument("--name", required=True)
    per = s.add_mutually_exclusive_group(required=True)
    per.add_argument("--calls-per-minute", type=int, metavar="N")
    per.add_argument("--tokens-per-minute", type=int, metavar="N")
    s.add_argument(
        "--fail",
        choices=("closed", "open"),
        default="closed",
        help="while a proxy cannot reach its collector: refuse once its slice is used "
        "(closed, default) or let calls through, flagged (open)",
    )
    _add_scope_options(s)
    d = lsub.add_parser("delete", help="remove a limit")
    d.add_argument("name")
    for q in (s, lsub.add_parser("list", help="every limit"), d):
        _add_where_options(q, "/api/limits")


def run_limits(args: argparse.Namespace, out: TextIO) -> None:
    """Run C{limits ACTION}; a L{BudgetError} is the caller's to print."""
    limit: RateLimit | None = None
    if args.limits_command == "set":
        calls = args.calls_per_minute
        limit = _defined(
            lambda: RateLimit(
                name=args.name,
                per_minute=calls if calls is not None else args.tokens_per_minute,
                unit="calls" if calls is not None else "tokens",
                fail=args.fail,
                **_scope_args(args),
            )
        )
    # only set makes a store: list and delete on a mistyped --db say so
    book = _book(args, _HTTPLimits, must_exist=limit is None)
    limits: RateLimitBook | _HTTPLimits = (
        book.limits if isinstance(book, SqlBudgetBook) else cast(_HTTPLimits, book)
    )
    try:
        if limit is not None:
            limits.set(limit)
            out.write(f"limit {limit.name} set: {_describe_limit(limit)}\n")
        elif args.limits_command == "delete":
            if not limits.delete(args.name):
                raise BudgetError(f"no limit named {args.name!r}")
            out.write(f"limit {args.name} deleted\n")
        else:
            defined = limits.list()
            if not defined:
                out.write("no limits defined\n")
            for limit in defined:
                out.write(f"{limit.name}: {_describe_limit(limit)}\n")
    finally:
        book.close()


def _describe_limit(limit: RateLimit) -> str:
    scope = ", ".join(f"{k}={v}" for k, v in limit.scope().items()) or "every call"
    fail = ", fail open" if limit.fail == "open" else ""
    return f"{limit.per_minute} {limit.unit} per minute, {scope}{fail}"


def store_book(db: str | None, *, migrate: bool = True, must_exist: bool = False) -> SqlBudgetBook:
    """The budget book of the store C{--db} names (a file, by default the
    embedded one, or a PostgreSQL database: migrated unless C{migrate} is
    false, as a reader leaves it); closing it closes the store.

    @param must_exist: refuse a store file that is not there (an action
        that only reads or removes), rather than create it.
    @raise BudgetError: the store cannot be opened.
    """
    if not (db and is_postgres_url(db)):
        path = Path(db).expanduser() if db else default_db_path()
        if must_exist and not path.exists():
            raise BudgetError(no_store_message(path))
        return SQLiteBudgetBook(path)
    try:
        # an action that only reads or removes leaves a database unmigrated
        store = open_store(db, migrate=migrate and not must_exist)
    except StoreError as e:
        raise BudgetError(str(e)) from e
    return SqlBudgetBook(store.sql(), on_close=store.close)


def _book(
    args: argparse.Namespace, http: type[_HTTPBook] = _HTTPBook, *, must_exist: bool = False
) -> SqlBudgetBook | _HTTPBook:
    """The store C{--db} names, or the collector C{--collector} names
    (through C{http}: its budgets or its limits); C{must_exist}: see
    L{store_book}."""
    db = getattr(args, "db_sub", None) or args.db
    collector = getattr(args, "collector_sub", None) or args.collector
    if collector:
        if db:
            raise BudgetError("give --db or --collector, not both")
        key = getattr(args, "key_sub", None) or getattr(args, "key", None)
        ca_file = getattr(args, "ca_file_sub", None) or getattr(args, "ca_file", None)
        return http(collector, key, ca_file)
    return store_book(db or db_from_env(), must_exist=must_exist)


def run_budgets(args: argparse.Namespace, out: TextIO) -> None:
    """Run C{budgets ACTION}; a L{BudgetError} is the caller's to print."""
    budget: Budget | None = None
    if args.budgets_command == "set":
        budget = _defined(
            lambda: Budget(
                name=args.name,
                limit_usd=args.limit_usd,
                window=args.window,
                tz=args.tz,
                action=args.action,
                unpriced=args.unpriced,
                fail=args.fail,
                **_scope_args(args),
            )
        )
    # only set makes a store: list and delete on a mistyped --db say so
    book = _book(args, must_exist=budget is None)
    try:
        if budget is not None:
            book.set(budget)
            out.write(f"budget {budget.name} set: {describe(budget)}\n")
        elif args.budgets_command == "delete":
            if not book.delete(args.name):
                raise BudgetError(f"no budget named {args.name!r}")
            out.write(f"budget {args.name} deleted\n")
        else:
            rows = book.status(time.time())
            if args.format == "json":
                out.write(json.dumps({"budgets": rows}, indent=2) + "\n")
            elif not rows:
                out.write("no budgets defined\n")
            else:
                write_budget_lines(out, rows)
    finally:
        book.close()


def budgets_of_collector(
    url: str, key: str | None = None, ca_file: str | None = None
) -> list[dict[str, Any]]:
    """Spend vs limit of each budget a collector keeps (C{GET /api/budgets})."""
    return _HTTPBook(url, key, ca_file).status(time.time())


def describe(budget: Budget) -> str:
    """One line: limit, window, scope and action."""
    scope = ", ".join(f"{k}={v}" for k, v in budget.scope().items()) or "every call"
    tz = f" ({budget.tz})" if budget.window in ("hour", "day", "month") else ""
    fail = ", fail open" if budget.fail == "open" else ""
    return (
        f"${usd_fixed(budget.limit_usd)} {_per(budget.window)}{tz}, {scope}, "
        f"action {budget.action}, unpriced calls {budget.unpriced}{fail}"
    )


def _per(window: str) -> str:
    """C{per day}; C{in total} for the window that never ends."""
    return "in total" if window == "total" else f"per {window}"


def _this(window: str) -> str:
    """C{this day}; C{so far} for the window that never ends."""
    return "so far" if window == "total" else f"this {window}"


def budget_status(book: SqlBudgetBook, now: float) -> list[dict[str, Any]]:
    """Each budget's definition with its spend and what is left in its window."""
    return book.status(now)


def write_budget_lines(out: TextIO, rows: list[dict[str, Any]]) -> None:
    """One line per budget: spend vs limit."""
    for r in rows:
        budget = Budget.from_dict({k: v for k, v in r.items() if k in _FIELDS})
        pct = 100.0 * r["spend_usd"] / budget.limit_usd if budget.limit_usd else 100.0
        out.write(
            f"{budget.name}: ${usd_fixed(round(r['spend_usd'], 8))} of "
            f"${usd_fixed(budget.limit_usd)} ({pct:.0f}%) {_this(budget.window)}; "
            f"{describe(budget)}\n"
        )


_FIELDS = frozenset(Budget.__dataclass_fields__)
