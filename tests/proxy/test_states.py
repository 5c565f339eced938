"""The transition tables of the proxy's state machines (llmobserve.proxy._states)."""

from __future__ import annotations

from enum import Enum
from itertools import product
from typing import Any

import pytest

from llmobserve.proxy._channel import CHANNEL_TRANSITIONS
from llmobserve.proxy._relay import RELAY_TRANSITIONS
from llmobserve.proxy._states import IllegalTransition, Transitions
from llmobserve.proxy._upstream import UPSTREAM_TRANSITIONS

TABLES = [CHANNEL_TRANSITIONS, RELAY_TRANSITIONS, UPSTREAM_TRANSITIONS]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_move_outside_the_table_raises(table: Transitions[Any]) -> None:
    """Each pair of states the table does not list raises (the tests run strict);
    each pair it lists is allowed."""
    edges = table.edges()
    states = {state for edge in edges for state in edge}
    for current, new in product(states, states):
        if (current, new) in edges:
            assert table.move(current, new) is new
        else:
            with pytest.raises(IllegalTransition):
                table.move(current, new)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_state_is_reachable_and_listed(table: Transitions[Any]) -> None:
    """No state of the enum is missing from the table, none is unreachable."""
    edges = table.edges()
    enum: type[Enum] = type(next(iter(edges))[0])
    states = list(enum)
    first = states[0]
    reached = {first}
    frontier = [first]
    while frontier:
        current = frontier.pop()
        for a, b in edges:
            if a is current and b not in reached:
                reached.add(b)
                frontier.append(b)
    assert reached == set(states)
