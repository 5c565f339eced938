"""Instructions and cache misses a call adds for budgets, counted, not timed.

    python -m bench.budget_instructions [--calls N]

Runs C{bench.budget_check}'s rig (with ten budgets, and without) under
valgrind's cachegrind with its cache simulation, each twice: warmed up and
then C{N} calls, and warmed up only. The difference over C{N} is what one
call executes; the two rigs' difference is what budgets add to a call:
instructions, and first-level instruction and data cache misses (each
miss costs about as much time as a dozen instructions, and the budget
check runs code and reads data the rest of a call does not).

Unlike C{bench.budget_check}'s timings, which drift with the machine's
state by a tenth and more between runs, these counts repeat to within a
few instructions: the clocks the rig reads are replaced by counters and
the hash seed is fixed, so that every run takes the same paths. A change
to the check can be weighed by them in a few minutes (docs/BENCHMARKS.md,
session 14). Needs valgrind (Debian's package); about a minute per 1,000
calls per run on this kind of machine.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

#: the counts read from cachegrind's summary line, in its order
_EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")
#: what is printed of them
_SHOWN = {"Ir": "instructions", "I1mr": "I1 misses", "D1mr": "D1 read misses"}


def _child(with_budgets: bool, calls: int) -> None:
    """One counted run: the rig warmed up, then C{calls} calls, with fixed clocks."""
    # counters for clocks: the same paths every run (deadlines, windows)
    time.time = itertools.count(1_765_000_000.0, 1e-6).__next__
    time.perf_counter = itertools.count(1_000.0, 1e-6).__next__
    time.monotonic = time.perf_counter
    from bench.budget_check import _rig

    rig = _rig(with_budgets)
    gc.collect()
    gc.disable()
    for _ in range(calls):
        rig.one()
    if rig.sink.count != 200 + calls:  # its warm-up's and these
        raise SystemExit(f"the rig relayed {rig.sink.count - 200} of {calls} calls")


def _count(valgrind: str, with_budgets: bool, calls: int, workdir: Path) -> dict[str, int]:
    out = workdir / f"cachegrind.{int(with_budgets)}.{calls}"
    subprocess.run(
        [
            valgrind,
            "--tool=cachegrind",
            "--cache-sim=yes",
            f"--cachegrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.budget_instructions",
            "--child",
            "with" if with_budgets else "without",
            "--calls",
            str(calls),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return dict(zip(_EVENTS, map(int, line.split()[1:]), strict=True))
    raise SystemExit(f"no summary in {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls counted per rig")
    parser.add_argument("--child", choices=("with", "without"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child == "with", args.calls)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("budget_instructions: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    per_call: dict[bool, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for with_budgets in (False, True):
            warm = _count(valgrind, with_budgets, 0, Path(tmp))
            run = _count(valgrind, with_budgets, args.calls, Path(tmp))
            per_call[with_budgets] = {k: (run[k] - warm[k]) / args.calls for k in _EVENTS}
    added = {k: per_call[True][k] - per_call[False][k] for k in _EVENTS}
    print(
        "budgets: "
        + ", ".join(f"{added[k]:+,.0f} {name}" for k, name in _SHOWN.items())
        + f" per call with 10 budgets (counted over {args.calls} calls; without budgets a call"
        f" executes {per_call[False]['Ir']:,.0f} instructions)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
