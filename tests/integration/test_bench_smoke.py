"""Smoke test of the overhead benchmark: it runs end to end and prints its answer line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_overhead_quick_prints_answer_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{python -m bench.overhead --quick} exits 0 and prints exactly one
    stdout line that the documented pattern parses (no timing assertions:
    the figures depend on the machine).
    """
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.overhead import ANSWER_RE

    done = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--quick", "--loadgen", "python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    match = ANSWER_RE.match(lines[0])
    assert match, lines[0]
    assert int(match["conc"]) == 64
    assert int(match["direct"]) > 0 and int(match["proxied"]) > 0
    assert int(match["rss"]) > 0
