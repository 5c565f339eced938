"""The collector: link server and HTTP API on one port, and the store (SQLite or PostgreSQL).

What other packages use is exported here. The store and the time
specifications (no Twisted: the CLI reads a store file with them) are
imported at once; the Twisted parts the proxy mounts for its embedded
C{/api} and C{/dashboard} (L{api_branch}, L{StoreThread},
L{DashboardResource}, and L{DashboardGate} with L{DashboardSessions} for
its login) on first use, so that the CLI does not load Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmobserve.collector._budgets import (
    SCOPE_FIELDS,
    Budget,
    BudgetBook,
    BudgetError,
    SqlBudgetBook,
    SQLiteBudgetBook,
    check_scope_provider,
    scope_matches,
)
from llmobserve.collector._grants import GrantBook
from llmobserve.collector._keys import KeyStoreError, Verdict
from llmobserve.collector._limits import RateLimit, RateLimitBook
from llmobserve.collector._open import DB_ENV, db_from_env, is_postgres_url, open_store
from llmobserve.collector._store import (
    FILTERS,
    GROUPS,
    NOT_FORWARDED,
    EventStore,
    Store,
    StoreError,
)
from llmobserve.collector._timespec import TimeSpecError, parse_time

if TYPE_CHECKING:
    from llmobserve.collector._dashboard import DashboardResource
    from llmobserve.collector._http import api_branch
    from llmobserve.collector._login import DashboardGate
    from llmobserve.collector._sessions import DashboardSessions
    from llmobserve.collector._thread import StoreThread

__all__ = [
    "DB_ENV",
    "FILTERS",
    "GROUPS",
    "NOT_FORWARDED",
    "SCOPE_FIELDS",
    "Budget",
    "BudgetBook",
    "BudgetError",
    "DashboardGate",
    "DashboardResource",
    "DashboardSessions",
    "EventStore",
    "GrantBook",
    "KeyStoreError",
    "RateLimit",
    "RateLimitBook",
    "SQLiteBudgetBook",
    "SqlBudgetBook",
    "Store",
    "StoreError",
    "StoreThread",
    "TimeSpecError",
    "Verdict",
    "api_branch",
    "check_scope_provider",
    "db_from_env",
    "is_postgres_url",
    "open_store",
    "parse_time",
    "scope_matches",
]

#: Names served on first use, and the module that defines each.
_LAZY = {
    "api_branch": "llmobserve.collector._http",
    "StoreThread": "llmobserve.collector._thread",
    "DashboardResource": "llmobserve.collector._dashboard",
    "DashboardGate": "llmobserve.collector._login",
    "DashboardSessions": "llmobserve.collector._sessions",
}


def __getattr__(name: str) -> Any:
    """Import a lazily exported name from its module (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
