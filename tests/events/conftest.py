"""Fixtures for the event-path tests (helpers live in C{eventkit})."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from events.eventkit import FakeCollector, make_txn

from llmobserve.proxy.transaction import Transaction


@pytest.fixture
def txn() -> Callable[..., Transaction]:
    return make_txn


@pytest.fixture
def fake_collector() -> Iterator[FakeCollector]:
    yield FakeCollector()
