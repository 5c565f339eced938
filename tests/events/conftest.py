"""Fixtures for the event-path tests (helpers live in C{eventkit})."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from events.eventkit import FakeCollector, make_txn

from llmobserve.events import _exchange
from llmobserve.transaction import Transaction
from parsers import _records


@pytest.fixture
def txn() -> Callable[..., Transaction]:
    return make_txn


@pytest.fixture
def fake_collector() -> Iterator[FakeCollector]:
    yield FakeCollector()


@pytest.fixture(autouse=True)
def _exchanges_built_as_their_constructor_builds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Exchange built through construct() is checked against
    Exchange(...) itself: all fields named, the same object."""
    construct = _records.construct  # what _exchange imported

    def check(cls: type[Any], /, **fields: Any) -> Any:
        fast, plain = construct(cls, **fields), cls(**fields)
        assert list(vars(fast)) == [f.name for f in dataclasses.fields(cls)]
        assert vars(fast) == vars(plain) and fast == plain and repr(fast) == repr(plain)
        return fast

    monkeypatch.setattr(_exchange, "construct", check)
