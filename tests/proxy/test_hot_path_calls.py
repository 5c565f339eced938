"""The relayed request's Python calls, counted: a tripwire for hot-path growth.

The bare proxy's CPU per request is mostly interpreter work spread over a
hundred-odd small calls (docs/BENCHMARKS.md, session 8): no one of them
stands out in a profile, so a feature that adds a few calls to every
request goes unnoticed until the overhead benchmark, on a quiet machine,
says the proxy got slower. Counting the calls is exact and machine
independent. The bounds sit a few calls above today's figures (126 and
131, the rig's own bookkeeping included); a change that needs more should
raise them knowingly, with its measured cost in BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest

from bench.budget_check import _rig as _budget_rig
from bench.hot_path import _Rig

#: Python-level calls per relayed request (rig included), by route.
BOUNDS = {"proxy": 132, "base-url": 137}
#: Python-level calls that ten budgets (five matching the call) add to a
#: base-URL request: the body, the bound, the labels, reserve, settle (6
#: today: the hold is made in C, its header inline, since session 13; 9
#: before, 16 before session 9).
BUDGET_CALLS = 7


def _calls_per_request(route: str, requests: int = 20, rig: Any = None) -> float:
    if rig is None:
        rig = _Rig(route)
    for _ in range(20):  # warm: pooled connection, parsed-target and Host caches
        rig.one()
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        for _ in range(requests):
            rig.one()
    finally:
        sys.setprofile(None)
    assert rig.sink.count >= 20 + requests
    return calls / requests


@pytest.mark.parametrize("route", sorted(BOUNDS))
def test_a_relayed_request_stays_within_its_python_calls(route: str) -> None:
    """A bare relayed POST (no keys, budgets or events) costs at most
    BOUNDS[route] Python calls, front end to transaction."""
    per_request = _calls_per_request(route)
    assert per_request <= BOUNDS[route], (
        f"{route}: {per_request:.0f} Python calls per relayed request, bound {BOUNDS[route]}"
    )


def test_ten_budgets_add_at_most_their_python_calls() -> None:
    """The budget check of bench.budget_check's rig (ten budgets, five
    matching) adds at most BUDGET_CALLS Python calls to a relayed request."""
    added = _calls_per_request("base-url", rig=_budget_rig(True)) - _calls_per_request(
        "base-url", rig=_budget_rig(False)
    )
    assert added <= BUDGET_CALLS, f"ten budgets add {added:.0f} Python calls, bound {BUDGET_CALLS}"
