"""CPU a call pays for budgets: the hot path with ten budgets defined, and without.

    python -m bench.budget_check [--requests N] [--repeats K]

Runs C{bench.hot_path}'s in-memory rig (the real front end, resource, relay
and pool; no sockets) in base-URL mode (C{/openai/...}, so the call has a
provider and a price) twice, alternating rounds: once with no budget
defined (the relay skips the check: one attribute test) and once with ten
budgets (five that match the call, five that do not), where each call's
worst case is bounded from its body and reserved on every matching budget,
and its hold settled by the sink as the parse pool would once priced.
Prints the median CPU per request of both and their difference, the
added CPU per call (target: under 10 us).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from bench.hot_path import _Rig
from llmobserve.collector import Budget
from llmobserve.proxy._budgets import BudgetLedger
from llmobserve.transaction import ITransactionSink, Transaction

__all__ = ["main"]

BUDGETS = [
    Budget("everything", 1e12, "month"),
    Budget("openai-day", 1e12, "day", provider="openai"),
    Budget("mini-hour", 1e12, "hour", model="gpt-4o-mini"),
    Budget("total", 1e12, "total"),
    Budget("warn", 1e12, "day", action="warn"),
    Budget("acme", 1e12, "day", customer="acme"),
    Budget("t1", 1e12, "day", tenant="t1"),
    Budget("plan", 1e12, "day", section="agent/plan"),
    Budget("claude", 1e12, "day", provider="anthropic"),
    Budget("big", 1e12, "day", model="gpt-4o"),
]


@implementer(ITransactionSink)
class _SettlingSink:
    """Settles each call's hold at a fixed cost, as the pipeline does once priced."""

    store_path = None

    def __init__(self) -> None:
        self.count = 0

    def transaction_finished(self, transaction: Transaction) -> None:
        self.count += 1
        hold = transaction.budget_hold
        if hold is not None:
            hold.settle(0.000012, transaction.outcome, transaction.status)

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        pass

    def health(self) -> Mapping[str, Any]:
        return {}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return []


def _rig(with_budgets: bool) -> _Rig:
    ledger = None
    if with_budgets:
        ledger = BudgetLedger(time.time)
        ledger.load(BUDGETS, {})
    rig = _Rig("base-url", budgets=ledger, sink=_SettlingSink())
    for _ in range(200):  # warm up: pool connection, price cache, scope cache
        rig.one()
    if rig.sink.count != 200:
        raise SystemExit("the rig did not relay its warm-up requests")
    return rig


def _round(rig: _Rig, requests: int) -> float:
    gc.collect()
    t0 = time.process_time()
    for _ in range(requests):
        rig.one()
    return (time.process_time() - t0) / requests * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    without, with_ = _rig(False), _rig(True)
    base: list[float] = []
    budgeted: list[float] = []
    for _ in range(args.repeats):  # alternate, so both see the same machine
        base.append(_round(without, args.requests))
        budgeted.append(_round(with_, args.requests))
    b, w = statistics.median(base), statistics.median(budgeted)
    print(
        f"budgets: {w - b:.1f}us added CPU per call with {len(BUDGETS)} budgets"
        f" (median {w:.1f}us vs {b:.1f}us without; best {min(budgeted):.1f} vs {min(base):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
