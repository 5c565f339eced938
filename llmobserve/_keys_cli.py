"""C{llmobserve keys}: create, list and revoke API keys.

With C{--db PATH} (on the collector's machine: how the first admin key is
made) the store file is changed directly; with C{--collector URL} the
collector's C{/api/keys} does it, given an admin key (C{--key} or
C{LLMOBSERVE_API_KEY}). C{create} prints the key once, alone on the last
line of its output; nothing else ever shows a key.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["add_keys_parser", "run_keys"]

_SCOPES = ("ingest", "read", "admin")


def add_keys_parser(
    sub: Any, add_source_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add C{keys create|list|revoke} to the command's subparsers."""
    keys = sub.add_parser(
        "keys",
        help="API keys of a collector (or proxy) that requires them",
        description=(
            "Projects and API keys. Scopes: ingest (a proxy's link, and a client of a "
            "proxy), read (GET /api/*, limited to the key's project), admin (everything). "
            "The first admin key is created with --db: the collector's store file, or the "
            "postgresql:// database the collectors share."
        ),
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key; prints it once, on the last line")
    create.add_argument("--name", required=True, help="a unique name for the key")
    create.add_argument("--project", default="default", help="the key's project (default: default)")
    create.add_argument("--scope", choices=_SCOPES, default="ingest", help="default: ingest")
    add_source_options(create)
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    add_source_options(listing)
    revoke = actions.add_parser("revoke", help="revoke a key by its name, id, or the key")
    revoke.add_argument("target", metavar="NAME|KEY")
    add_source_options(revoke)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _describe(info: dict[str, Any]) -> str:
    state = f"revoked {_when(info['revoked'])}" if info.get("revoked") else "active"
    return (
        f"{info['id']}  {info['name']}  project={info['project']}  scope={info['scope']}  "
        f"created {_when(info['created'])}  {state}"
    )


def run_keys(
    args: argparse.Namespace,
    out: TextIO,
    collector: Callable[[argparse.Namespace], Any],
    error: type[Exception],
) -> None:
    """Run C{keys ACTION}.

    @param collector: opens the C{--collector} source (its C{_get} sends a
        request with the C{--key}).
    @param error: what a user-facing failure raises (the command's C{CLIError}).
    """
    CLIError = error  # the command's exception class
    if args.collector:
        if args.db:
            raise CLIError("give --db or --collector, not both")
        source = collector(args)
        if args.keys_command == "create":
            body = {"name": args.name, "project": args.project, "scope": args.scope}
            made = source._get("/api/keys", [], body)
            info, key = {k: v for k, v in made.items() if k != "key"}, made["key"]
        elif args.keys_command == "list":
            infos = source._get("/api/keys", [])["keys"]
        else:
            info = source._get("/api/keys/revoke", [], {"key": args.target})
    else:
        from llmobserve.collector import (
            KeyStoreError,
            StoreError,
            db_from_env,
            is_postgres_url,
            open_store,
        )
        from llmobserve.paths import default_db_path, no_store_message

        named = args.db or db_from_env()  # as report: $LLMOBSERVE_DB by default
        db: str | Path = named if named and is_postgres_url(named) else ""
        if not db:
            db = Path(named).expanduser() if named else default_db_path()
            if args.keys_command != "create" and not db.exists():
                raise CLIError(no_store_message(db))  # only create makes a store
        try:
            # a PostgreSQL database is migrated as a collector's start-up does
            store = open_store(db)
        except StoreError as e:
            raise CLIError(str(e)) from e
        try:
            if args.keys_command == "create":
                made_info, key = store.keys.create(args.name, args.project, args.scope)
                info = made_info.as_dict()
            elif args.keys_command == "list":
                infos = [k.as_dict() for k in store.keys.list()]
            else:
                info = store.keys.revoke(args.target).as_dict()
        except (KeyStoreError, StoreError) as e:
            raise CLIError(str(e)) from e
        finally:
            store.close()
    if args.keys_command == "create":
        out.write(f"created {_describe(info)}\n")
        out.write("the key is shown only this once:\n")
        out.write(f"{key}\n")
    elif args.keys_command == "list":
        for item in infos:
            out.write(_describe(item) + "\n")
        if not infos:
            out.write("no keys\n")
    else:
        out.write(f"revoked {_describe(info)}\n")
