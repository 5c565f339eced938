"""Time bounds as users write them: ISO dates, unix seconds, or C{24h}/C{7d} ago.

Shared by the HTTP API and the C{llmobserve} command; no Twisted here.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, date, datetime
from typing import Final

__all__ = ["EARLIEST", "LATEST", "TimeSpecError", "parse_time"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: The first and last instants a bound may name: years 1 to 9999 (UTC), the
#: range of Python's datetime, so every accepted bound can be shown as a date.
EARLIEST: Final = datetime(1, 1, 1, tzinfo=UTC).timestamp()
LATEST: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


class TimeSpecError(ValueError):
    """A time bound that is none of the accepted forms."""


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds for C{text}.

    Accepted: C{now}; a relative span before now (C{90s}, C{30m}, C{24h},
    C{7d}, C{2w}); unix seconds (C{1735689600} or C{1735689600.5}); an ISO
    8601 date or date-time (C{2025-01-31}, C{2025-01-31T12:00},
    C{2025-01-31T12:00:00+02:00}). Dates and date-times without an offset
    are UTC, like the report's C{day} and C{hour} groups. Whatever the form,
    the instant must fall within the years 1 to 9999 (L{EARLIEST} to
    L{LATEST}).

    @raise TimeSpecError: none of these, or an instant outside those years
        (C{1e308}, C{<400 nines>h}).
    """
    if now is None:
        now = time.time()
    s = text.strip()
    if s.lower() == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        return _in_range(text, now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
    try:
        seconds = float(s)
    except ValueError:
        pass
    else:
        return _in_range(text, seconds)
    try:
        if len(s) == 10:
            d = date.fromisoformat(s)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise TimeSpecError(
            f"cannot read time {text!r}: use an ISO date (2025-01-31), "
            "a date-time (2025-01-31T12:00Z), unix seconds, or a span ago (24h, 7d)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # an offset can carry year 1 or 9999 just past the range
    return _in_range(text, dt.timestamp())


def _in_range(text: str, seconds: float) -> float:
    """C{seconds} if it is a finite instant within years 1 to 9999."""
    if not math.isfinite(seconds):
        raise TimeSpecError(f"cannot read time {text!r}: not a finite number")
    if not EARLIEST <= seconds <= LATEST:
        raise TimeSpecError(
            f"time {text!r} is outside the years 1 to 9999 "
            f"(unix seconds {EARLIEST:.0f} to {LATEST:.0f})"
        )
    return seconds
