"""The C{llmobserve} command: cost reports and event exports.

Both subcommands read either an event store file (C{--db}, by default the
one the proxy's embedded mode writes) or a running collector's HTTP API
(C{--collector URL}). Importing this module does not import Twisted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from llmobserve import __version__
from llmobserve._budgetcli import (
    BadDefinition,
    add_budgets_parser,
    add_limits_parser,
    budget_status,
    budgets_of_collector,
    run_budgets,
    run_limits,
    store_book,
    write_budget_lines,
)
from llmobserve.collector import (
    FILTERS,
    GROUPS,
    NOT_FORWARDED,
    BudgetError,
    StoreError,
    TimeSpecError,
    db_from_env,
    is_postgres_url,
    open_store,
    parse_time,
)
from llmobserve.money import usd_fixed
from llmobserve.paths import ENV_HOME, default_db_path, no_store_message

from ._keys_cli import add_keys_parser, run_keys

__all__ = ["main"]

_PAGE = 5000  # events fetched per query when exporting


def _paged(
    fetch: Callable[[int, int], list[dict[str, Any]]], limit: int | None, offset: int
) -> Iterator[dict[str, Any]]:
    """Every event from C{offset} on (at most C{limit}), fetched C{_PAGE} at a time."""
    left = limit
    while left is None or left > 0:
        n = _PAGE if left is None else min(_PAGE, left)
        page = fetch(n, offset)
        yield from page
        if len(page) < n:
            return
        offset += len(page)
        if left is not None:
            left -= len(page)


_HTTP_TIMEOUT = 30.0

_EPILOG = f"""\
--db and --collector, in detail:
  --db PATH          an event store file; default {ENV_HOME}/events.sqlite3 with
                     {ENV_HOME} defaulting to ~/.llmobserve (now: %(db)s).
                     The proxy's embedded mode and the collector both write this format.
  --db postgresql://user@host:5432/dbname
                     a collector's PostgreSQL database (also $LLMOBSERVE_DB).
  --collector URL    a running collector's HTTP API, e.g. http://localhost:8000

times (--since, --until): an ISO date or date-time (2025-01-31, 2025-01-31T12:00Z;
  no offset means UTC), unix seconds, "now", or a span before now: 90s, 30m, 24h, 7d, 2w.

examples:
  llmobserve report                                   cost by provider and model, all time
  llmobserve report --since 24h --by customer         cost per customer, last 24 hours
  llmobserve report --by provider,model,day --format csv > cost.csv
  llmobserve report --collector http://localhost:8000 --since 2025-01-01 --format json
  llmobserve events --format jsonl --since 1h         the last hour's events, one JSON a line
  llmobserve events --customer acme --limit 10        ten of one customer's events

see docs/COLLECTOR.md for the store schema, the HTTP API and the collector itself.
"""


class CLIError(Exception):
    """A user-facing failure: printed without a traceback, exit status 1."""


# -- where the data comes from -------------------------------------------------


class _Source:
    def report(
        self, by: Sequence[str], since: float | None, until: float | None, filters: dict[str, Any]
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def events(
        self,
        since: float | None,
        until: float | None,
        limit: int | None,
        offset: int,
        filters: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StoreSource(_Source):
    def __init__(self, path: Path | str) -> None:
        if not is_postgres_url(path) and not Path(path).exists():
            raise CLIError(no_store_message(path))
        try:
            # a reader: a PostgreSQL schema is checked, never created or migrated
            self._store = open_store(path, migrate=False)
        except StoreError as e:
            raise CLIError(str(e)) from e

    def report(
        self, by: Sequence[str], since: float | None, until: float | None, filters: dict[str, Any]
    ) -> list[dict[str, Any]]:
        return self._store.report(by, since=since, until=until, **filters)

    def events(
        self,
        since: float | None,
        until: float | None,
        limit: int | None,
        offset: int,
        filters: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        def page(n: int, at: int) -> list[dict[str, Any]]:
            return self._store.events(since=since, until=until, limit=n, offset=at, **filters)

        return _paged(page, limit, offset)

    def close(self) -> None:
        self._store.close()


class _CollectorSource(_Source):
    def __init__(self, url: str, ca_file: str | None = None, key: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CLIError(f"--collector needs an http(s) URL, not {url!r}")
        self._base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))
        self._base = self._base.rstrip("/")
        # https: the system's CAs, plus a private CA's (never fewer checks)
        self._tls = ssl.create_default_context()
        if ca_file is not None:
            try:
                self._tls.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise CLIError(f"--ca-file {ca_file}: {e}") from e
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _get(self, path: str, params: list[tuple[str, Any]], body: Any = None) -> Any:
        query = urllib.parse.urlencode([(k, v) for k, v in params if v is not None])
        url = f"{self._base}{path}?{query}" if query else f"{self._base}{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT, context=self._tls) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except Exception:
                message = str(e)
            raise CLIError(f"collector at {self._base} refused the query: {message}") from e
        except (urllib.error.URLError, OSError) as e:
            raise CLIError(f"cannot reach the collector at {self._base}: {e}") from e
        except ValueError as e:
            raise CLIError(f"{self._base} did not answer JSON: is it a collector?") from e

    @staticmethod
    def _common(
        since: float | None, until: float | None, filters: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = [(k, v) for k, v in filters.items() if v is not None]
        params += [("since", since), ("until", until)]
        return params

    def report(
        self, by: Sequence[str], since: float | None, until: float | None, filters: dict[str, Any]
    ) -> list[dict[str, Any]]:
        body = self._get(
            "/api/report", [("by", ",".join(by)), *self._common(since, until, filters)]
        )
        rows: list[dict[str, Any]] = body["rows"]
        return rows

    def events(
        self,
        since: float | None,
        until: float | None,
        limit: int | None,
        offset: int,
        filters: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        def page(n: int, at: int) -> list[dict[str, Any]]:
            params = [*self._common(since, until, filters), ("limit", n), ("offset", at)]
            events: list[dict[str, Any]] = self._get("/api/events", params)["events"]
            return events

        return _paged(page, limit, offset)


# -- output --------------------------------------------------------------------

_SUMS = (
    "calls",
    "cost_usd",
    "unpriced_calls",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "estimated_cost_usd",
    "estimated_calls",
)
_TABLE_SUMS = ("calls", "cost_usd", "input_tokens", "output_tokens", "unpriced_calls")
_HEADINGS = {
    "calls": "calls",
    "cost_usd": "cost (USD)",
    "input_tokens": "input tok",
    "output_tokens": "output tok",
    "unpriced_calls": "unpriced",
}


def _cost(value: Any) -> str:
    if value is None:
        return "-"
    v = float(value)
    if v == 0:
        return "$0"
    if abs(v) >= 1:
        return f"${v:,.2f}"
    return "$" + usd_fixed(round(v, 8))


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for key in _SUMS:
        values = [r.get(key) for r in rows]
        if key in ("cost_usd", "estimated_cost_usd"):
            priced = [v for v in values if v is not None]
            total[key] = sum(priced) if priced else None
        else:
            total[key] = sum(v or 0 for v in values)
    return total


def write_table(
    out: TextIO,
    by: Sequence[str],
    rows: list[dict[str, Any]],
    none: str = "no calls",
    not_forwarded: str | None = None,
) -> None:
    """A readable report: one line per group, a total line, numbers right-aligned.

    @param none: the line written when there is no call to report.
    @param not_forwarded: the outcome, when the report is of calls the
        proxy did not forward (C{--outcome budget_refused}): they have no
        price because they cost nothing, which the last line says instead
        of counting them as calls of unknown price.
    """
    if not rows or (not by and rows[0].get("calls", 0) == 0):
        out.write(f"{none}\n")
        return
    if not_forwarded:  # they cost nothing: not "unpriced", whose cost is unknown
        rows = [{**r, "cost_usd": 0.0, "unpriced_calls": 0} for r in rows]
    headings = [*by, *(_HEADINGS[k] for k in _TABLE_SUMS)]
    lines: list[list[str]] = []
    for r in rows:
        lines.append([("-" if r.get(g) is None else str(r.get(g))) for g in by] + _sum_cells(r))
    if len(rows) > 1 or not by:
        total = _total(rows)
        label = ["TOTAL"] + [""] * (len(by) - 1) if by else []
        footer = label + _sum_cells(total)
    else:
        footer = None
    all_lines = [headings, *lines] + ([footer] if footer else [])
    widths = [max(len(line[i]) for line in all_lines) for i in range(len(headings))]
    n_text = len(by)

    def fmt(cells: list[str]) -> str:
        parts = [
            c.ljust(widths[i]) if i < n_text else c.rjust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip() + "\n"

    out.write(fmt(headings))
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in lines:
        out.write(fmt(line))
    if footer and by:
        out.write("  ".join("-" * w for w in widths) + "\n")
        out.write(fmt(footer))
    estimated_calls = sum(r.get("estimated_calls") or 0 for r in rows)
    if estimated_calls:
        estimated = _total(rows)["estimated_cost_usd"]
        out.write(
            f"\nof the cost, {_cost(estimated)} is estimated: {estimated_calls} call(s) whose"
            " stream reported no usage, tokens counted by the proxy (usage_source estimated).\n"
        )
    unpriced = sum(r.get("unpriced_calls") or 0 for r in rows)
    if unpriced:
        out.write(
            f"\n{unpriced} call(s) had no known price: their cost is not in the sums "
            "(never counted as $0).\n"
        )
    elif not_forwarded:
        out.write(f"\n{not_forwarded}: the proxy answered these itself, they cost nothing.\n")


def _sum_cells(r: dict[str, Any]) -> list[str]:
    return [
        f"{r.get('calls') or 0:,}",
        _cost(r.get("cost_usd")),
        f"{r.get('input_tokens') or 0:,}",
        f"{r.get('output_tokens') or 0:,}",
        f"{r.get('unpriced_calls') or 0:,}",
    ]


def write_csv(out: TextIO, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """CSV with a header line; maps and lists as JSON text, null as empty."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(fields)
    for r in rows:
        w.writerow([_csv_cell(r.get(f)) for f in fields])


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return usd_fixed(value)  # cost_usd: 0.0000072, never 7.2e-06
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return value


# -- commands ------------------------------------------------------------------


def _source(args: argparse.Namespace) -> _Source:
    if args.collector:
        if args.db:
            raise CLIError("give --db or --collector, not both")
        return _CollectorSource(args.collector, args.ca_file, _key(args))
    if args.ca_file:
        raise CLIError("--ca-file is for an https:// --collector")
    db = args.db or db_from_env()
    if db and is_postgres_url(db):
        return _StoreSource(db)
    return _StoreSource(Path(db).expanduser() if db else default_db_path())


def _key(args: argparse.Namespace) -> str | None:
    key: str | None = getattr(args, "key", None) or os.environ.get("LLMOBSERVE_API_KEY") or None
    return key


def _times(args: argparse.Namespace) -> tuple[float | None, float | None]:
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except TimeSpecError as e:
        raise CLIError(str(e)) from e
    return since, until


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in FILTERS}


def _cmd_report(args: argparse.Namespace, out: TextIO) -> None:
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    for name in by:
        if name not in GROUPS:
            raise CLIError(f"unknown --by {name!r}; choose from: {', '.join(GROUPS)}")
    since, until = _times(args)
    filters = _filters(args)
    filters.pop("kind", None)
    source = _source(args)
    try:
        rows = source.report(by, since, until, filters)
        refused = _not_forwarded(source, since, until, filters)
    except StoreError as e:
        raise CLIError(str(e)) from e
    finally:
        source.close()
    budgets = _budgets_of(args)
    if args.format == "json":
        doc = {"by": by, "since": since, "until": until, "rows": rows, "refused": refused}
        if budgets:
            doc["budgets"] = budgets
        out.write(json.dumps(doc, indent=2) + "\n")
    elif args.format == "csv":
        write_csv(out, [*by, *_SUMS], rows)
    else:
        outcome = filters.get("outcome")
        apart = outcome if outcome in NOT_FORWARDED else None
        write_table(out, by, rows, _no_calls(since, until, filters), apart)
        if any(refused.values()):
            out.write(_refused_line(refused))
        if budgets:
            out.write("\nbudgets (spend vs limit, current window):\n")
            write_budget_lines(out, budgets)


def _no_calls(since: float | None, until: float | None, filters: dict[str, Any]) -> str:
    """What an empty report says: which of its bounds left nothing."""
    if since is not None or until is not None:
        return "no calls in this window"
    if any(v is not None for v in filters.values()):
        return "no calls match these filters"
    return "no calls recorded yet"


def _budgets_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spend vs limit of each budget in a store file or a collector (an
    older collector without C{/api/budgets}: none)."""
    if args.collector:
        try:
            return budgets_of_collector(args.collector, _key(args), args.ca_file)
        except BudgetError:
            return []
    try:
        # a reader: a PostgreSQL schema is checked, never created or migrated
        book = store_book(args.db or db_from_env(), migrate=False)
    except BudgetError:
        return []
    try:
        return budget_status(book, time.time())
    except StoreError:
        return []  # the PostgreSQL server went away after the report
    finally:
        book.close()


def _not_forwarded(
    source: _Source, since: float | None, until: float | None, filters: dict[str, Any]
) -> dict[str, int]:
    """Calls the proxy answered itself, by outcome (C{{}} when the filter names one)."""
    if filters.get("outcome") is not None:
        return {}
    counts = {}
    for outcome in NOT_FORWARDED:
        [total] = source.report([], since, until, {**filters, "outcome": outcome}) or [{}]
        counts[outcome] = int(total.get("calls") or 0)
    return counts


def _refused_line(refused: dict[str, int]) -> str:
    """The report's own line for calls the proxy answered itself (not in the counts)."""
    n = sum(refused.values())
    parts = ", ".join(f"{k} {v}" for k, v in refused.items() if v)
    return f"refused: {n} call{'s' if n != 1 else ''} not forwarded ({parts}), not counted above\n"


def _cmd_events(args: argparse.Namespace, out: TextIO) -> None:
    since, until = _times(args)
    if args.limit is not None and args.limit < 0:
        raise CLIError("--limit must not be negative")
    source = _source(args)
    try:
        events = source.events(since, until, args.limit, args.offset, _filters(args))
        if args.format == "jsonl":
            for event in events:
                out.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
        elif args.format == "json":
            out.write(json.dumps(list(events), indent=2, ensure_ascii=False) + "\n")
        else:
            rows = list(events)
            fields: list[str] = []
            for e in rows:
                fields += [k for k in e if k not in fields]
            write_csv(out, fields, rows)
    except StoreError as e:
        raise CLIError(str(e)) from e
    finally:
        source.close()


def _add_source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the data comes from")
    g.add_argument(
        "--db",
        metavar="PATH|URL",
        help=f"event store file or postgresql:// URL (default: $LLMOBSERVE_DB, "
        f"else ${ENV_HOME}/events.sqlite3, ~/.llmobserve/...)",
    )
    g.add_argument(
        "--collector", metavar="URL", help="a collector's HTTP API, e.g. http://localhost:8000"
    )
    g.add_argument(
        "--ca-file",
        metavar="PEM",
        help="extra CAs to trust for an https:// collector (a private CA)",
    )
    g.add_argument(
        "--key",
        metavar="KEY",
        help="API key for a --collector that requires keys (default: $LLMOBSERVE_API_KEY)",
    )


def _add_window_options(p: argparse.ArgumentParser, kinds: bool) -> None:
    g = p.add_argument_group("which calls")
    g.add_argument("--since", metavar="TIME", help="from this time on (2025-01-31, 24h, 7d, ...)")
    g.add_argument("--until", metavar="TIME", help="before this time")
    for name in FILTERS:
        if name == "kind" and not kinds:
            continue
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, dest=name, metavar="VALUE", help=_FILTER_HELP[name])


_FILTER_HELP = {
    "provider": "only this provider id (openai, anthropic, pinecone, ...)",
    "model": "only this model",
    "endpoint": "only this endpoint (chat.completions, query, ...)",
    "customer": "only this customer id (context.customer_id)",
    "tenant": "only this tenant id (context.tenant_id)",
    "section": "only this section label",
    "section_path": "only this section path and the sections nested under it",
    "run": "only this run id (context.run_id)",
    "outcome": "only this outcome (ok, upstream_error, client_aborted, ...)",
    "kind": "only this record kind: call, span or gap",
    "host": "only this target host",
    "project": "only this project (a key's project; a read key sees only its own)",
    "status": "only this HTTP status (200, 429, ...)",
    "usage_source": "only this usage provenance (reported, estimated, missing, ...)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents everything in C{--help})."""
    epilog = _EPILOG % {"db": default_db_path()}
    parser = argparse.ArgumentParser(
        prog="llmobserve",
        description="Reports and exports of the API calls llmobserve has seen and priced.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmobserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = sub.add_parser(
        "report",
        help="cost, tokens and calls grouped by provider, model, customer, ...",
        description=(
            "Sum cost_usd, tokens and calls of the stored call events, grouped by "
            f"--by (any of: {', '.join(GROUPS)}); most expensive first. Calls with no "
            "known price are counted as unpriced, never as $0."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "--by",
        default="provider,model",
        metavar="LIST",
        help="comma list of groupings (default: provider,model; empty for one total)",
    )
    report.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="default: table"
    )
    _add_source_options(report)
    _add_window_options(report, kinds=False)

    events = sub.add_parser(
        "events",
        help="export stored events (jsonl: one JSON object per line)",
        description=(
            "Print stored events, oldest first, with the event field names of the design "
            "(id, ts, provider, model, usage, cost_usd, context, ...); spans and gap "
            "records too unless --kind narrows it."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    events.add_argument(
        "--format", choices=("jsonl", "json", "csv"), default="jsonl", help="default: jsonl"
    )
    events.add_argument("--limit", type=int, metavar="N", help="at most N events (default: all)")
    events.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N")
    _add_source_options(events)
    _add_window_options(events, kinds=True)
    add_keys_parser(sub, _add_source_options)
    add_budgets_parser(sub)
    add_limits_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command; return the exit status (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out if out is not None else sys.stdout
    if args.command is None:
        parser.print_help(out)
        return 2
    try:
        if args.command == "report":
            _cmd_report(args, out)
        elif args.command == "keys":
            run_keys(
                args,
                out,
                lambda a: _CollectorSource(a.collector, a.ca_file, _key(a)),
                CLIError,
            )
        elif args.command == "budgets":
            run_budgets(args, out)
        elif args.command == "limits":
            run_limits(args, out)
        else:
            _cmd_events(args, out)
    except BadDefinition as e:  # a value argparse could not check: usage, as its own
        action = getattr(args, f"{args.command}_command", "")
        print(f"llmobserve {args.command} {action}: error: {e}", file=sys.stderr)
        print(f"(see llmobserve {args.command} {action} --help)", file=sys.stderr)
        return 2
    except (CLIError, BudgetError) as e:
        print(f"llmobserve: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `llmobserve events | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
