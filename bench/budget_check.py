"""CPU a call pays for budgets: the hot path with ten budgets defined, and without.

    python -m bench.budget_check [--requests N] [--repeats K] [--customers C]
                                 [--body-bytes B] [--no-floor]

Runs C{bench.hot_path}'s in-memory rig (the real front end, resource, relay
and pool; no sockets) in base-URL mode (C{/openai/...}, so the call has a
provider and a price) twice: once with no budget defined (the relay skips
the check: one attribute test) and once with ten budgets of $1,000 (five
that match the call, five that do not), where each call's worst case is
bounded from its body and reserved on every matching budget, and its hold
settled by the sink as the parse pool would once priced.

The two rigs take turns in short rounds (C{--requests} each, C{--repeats}
pairs), and each pair gives one difference: on a shared machine whose
speed drifts by tens of percent from one second to the next, adjacent
rounds see the same machine, where long rounds each saw a different one.
Prints the median difference, the added CPU per call (target: under
10 us), with its quartiles, and the median CPU per request of both.
With C{--customers C} the requests take turns among C customer labels:
C call scopes in flight, each with a plan and an allotment of its own.
With C{--body-bytes B} the request's system prompt is lengthened to make
a body of about B bytes (the bound reads every byte of it; the default
is a 198-byte chat request).

The machine drifts between states tens of percent apart within minutes,
so the floor (stock portforward, C{bench._floorcpu}) runs beside the rig,
on its core, and is measured between the rounds; the added CPU is also
given as a share of the floor's CPU per request and as what that share
was on the anchors' machine (its floor: 38 us per request;
docs/PERFORMANCE.md). C{--no-floor} skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

from zope.interface import implementer

from bench._floorcpu import ANCHOR_FLOOR_CPU_US, running_floor
from bench.hot_path import _Rig
from llmobserve.collector import Budget
from llmobserve.proxy._budgets import BudgetLedger
from llmobserve.transaction import ITransactionSink, Transaction

__all__ = ["main"]

BUDGETS = [
    Budget("everything", 1000.0, "month"),
    Budget("openai-day", 1000.0, "day", provider="openai"),
    Budget("mini-hour", 1000.0, "hour", model="gpt-4o-mini"),
    Budget("total", 1000.0, "total"),
    Budget("warn", 1000.0, "day", action="warn"),
    Budget("acme", 1000.0, "day", customer="acme"),
    Budget("t1", 1000.0, "day", tenant="t1"),
    Budget("plan", 1000.0, "day", section="agent/plan"),
    Budget("claude", 1000.0, "day", provider="anthropic"),
    Budget("big", 1000.0, "day", model="gpt-4o"),
]


#: the cost and usage each call's event is priced at
_COST: Final = 0.000012
_USAGE: Final = {"input_tokens": 40, "output_tokens": 10}


@implementer(ITransactionSink)
class _SettlingSink:
    """Settles each call's hold at a fixed cost, as the pipeline does once
    priced (C{EventPipeline}): its parse thread queues the hold with the
    event's cost and usage, and the reactor settles the queue when the
    batch comes back (here a batch of one call, the pipeline's at one
    client)."""

    store_path = None

    def __init__(self) -> None:
        self.count = 0
        self._settlements: deque[tuple[Any, Any, str, int | None, Any]] = deque()

    def transaction_finished(self, transaction: Transaction) -> None:
        self.count += 1
        if transaction.budget_hold is not None:  # the parse thread's part
            self._settlements.append(
                (transaction.budget_hold, _COST, transaction.outcome, transaction.status, _USAGE)
            )
        settlements = self._settlements  # the reactor's, once the batch is back
        while settlements:
            hold, cost, outcome, status, usage = settlements.popleft()
            hold.settle(cost if type(cost) is float else None, outcome, status, usage)

    def spans_received(self, spans: Sequence[Mapping[str, Any]]) -> None:
        pass

    def health(self) -> Mapping[str, Any]:
        return {}

    def metrics(self) -> Sequence[tuple[str, str, str, float]]:
        return []


def _longer(request: bytes, size: int) -> bytes:
    """The request with its system prompt lengthened (lines of prose, as
    system prompts are written) to make a body of about C{size} bytes."""
    head, _, body = request.partition(b"\r\n\r\n")
    doc = json.loads(body)
    line = "Answer in the user's language; cite the documents you were given.\n"
    missing = max(0, size - len(body))
    doc["messages"][0]["content"] += line * (missing // (len(line) + 1) + 1)
    longer = json.dumps(doc, separators=(",", ":")).encode()
    head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(longer), head)
    return head + b"\r\n\r\n" + longer


class _Rotating(_Rig):
    """The rig, its requests taking turns among C{customers} customer labels
    (C{X-LLMObserve-Customer-Id}): that many call scopes in flight, each
    with a plan (and an allotment) of its own. One customer: the label is not sent."""

    def __init__(self, customers: int, body_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__("base-url", **kwargs)
        plain = self.request if body_bytes is None else _longer(self.request, body_bytes)
        cut = plain.index(b"\r\n") + 2  # after the request line
        self.requests = [plain]
        if customers > 1:
            self.requests = [
                plain[:cut] + b"X-LLMObserve-Customer-Id: c%d\r\n" % i + plain[cut:]
                for i in range(customers)
            ]
        self.turn = 0

    def one(self) -> None:
        requests = self.requests
        self.request = requests[self.turn % len(requests)]
        self.turn += 1
        super().one()


def _rig(with_budgets: bool, customers: int = 1, body_bytes: int | None = None) -> _Rotating:
    ledger = None
    if with_budgets:
        ledger = BudgetLedger(time.time)
        ledger.load(BUDGETS, {})
    rig = _Rotating(customers, body_bytes, budgets=ledger, sink=_SettlingSink())
    for _ in range(200):  # warm up: pool connection, price cache, scope cache
        rig.one()
    if rig.sink.count != 200:
        raise SystemExit("the rig did not relay its warm-up requests")
    return rig


#: the floor is measured every this many pairs of rounds (and at the end), for this long
_FLOOR_EVERY: Final = 25
_FLOOR_SECONDS: Final = 0.5


def _round(rig: _Rig, requests: int) -> float:
    t0 = time.process_time()
    for _ in range(requests):
        rig.one()
    return (time.process_time() - t0) / requests * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=250, help="requests per round")
    parser.add_argument("--repeats", type=int, default=200, help="pairs of rounds")
    parser.add_argument(
        "--customers",
        type=int,
        default=1,
        help="customer labels the requests take turns among (call scopes in flight)",
    )
    parser.add_argument(
        "--body-bytes",
        type=int,
        default=None,
        help="lengthen the request's system prompt to a body of about this many bytes",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip measuring the floor's CPU per request between the rounds",
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        measure = stack.enter_context(running_floor()) if args.floor else None
        without = _rig(False, args.customers, args.body_bytes)
        with_ = _rig(True, args.customers, args.body_bytes)
        floors: list[float] = []
        base: list[float] = []
        budgeted: list[float] = []
        added: list[float] = []
        gc.collect()
        for i in range(args.repeats):
            if measure is not None and i % _FLOOR_EVERY == 0:
                floors.append(measure(_FLOOR_SECONDS))
                gc.collect()
            # each pair in both orders, half the time: neither rig always runs
            # first after the other has filled the caches
            if i % 2:
                w = _round(with_, args.requests)
                b = _round(without, args.requests)
            else:
                b = _round(without, args.requests)
                w = _round(with_, args.requests)
            base.append(b)
            budgeted.append(w)
            added.append(w - b)
        if measure is not None:
            floors.append(measure(_FLOOR_SECONDS))
    q1, median, q3 = _quartiles(added)
    body = len(with_.requests[0].partition(b"\r\n\r\n")[2])
    line = (
        f"budgets: {median:.1f}us added CPU per call with {len(BUDGETS)} budgets"
        + (f", {args.customers} customers" if args.customers > 1 else "")
        + f", a {body}-byte body"
        + f" (quartiles {q1:.1f}..{q3:.1f} over {len(added)} pairs of rounds;"
        f" median {statistics.median(budgeted):.1f}us vs {statistics.median(base):.1f}us without)"
    )
    if floors:
        floor = statistics.median(floors)
        line += (
            f" | floor cpu/req {floor:.0f}us (median of {len(floors)},"
            f" {min(floors):.0f}..{max(floors):.0f}):"
            f" {median / floor:.3f}x, {median / floor * ANCHOR_FLOOR_CPU_US:.1f}us"
            f" on the anchors' machine (target: under 10us,"
            f" {10 / ANCHOR_FLOOR_CPU_US:.3f}x)"
        )
    print(line)
    return 0


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


if __name__ == "__main__":
    sys.exit(main())
