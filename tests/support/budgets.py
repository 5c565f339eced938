"""A store file with budgets set, as a proxy's poller reads it."""

from __future__ import annotations

from pathlib import Path

from llmobserve.collector import Budget, EventStore, SQLiteBudgetBook


def store_with(path: Path, *budgets: Budget) -> Path:
    """Make the store file C{path} and set C{budgets} in it; returns C{path}."""
    EventStore(path).close()
    book = SQLiteBudgetBook(path)
    for budget in budgets:
        book.set(budget)
    book.close()
    return path
