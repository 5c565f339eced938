"""Time bounds as users write them: ISO dates, unix seconds, or C{24h}/C{7d} ago.

Shared by the HTTP API and the C{llmobserve} command; no Twisted here.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, date, datetime

__all__ = ["TimeSpecError", "parse_time"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeSpecError(ValueError):
    """A time bound that is none of the accepted forms."""


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds for C{text}.

    Accepted: C{now}; a relative span before now (C{90s}, C{30m}, C{24h},
    C{7d}, C{2w}); unix seconds (C{1735689600} or C{1735689600.5}); an ISO
    8601 date or date-time (C{2025-01-31}, C{2025-01-31T12:00},
    C{2025-01-31T12:00:00+02:00}). Dates and date-times without an offset
    are UTC, like the report's C{day} and C{hour} groups.

    @raise TimeSpecError: none of these.
    """
    if now is None:
        now = time.time()
    s = text.strip()
    if s.lower() == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        return now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    try:
        seconds = float(s)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        raise TimeSpecError(f"cannot read time {text!r}: not a finite number")
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
    return dt.timestamp()
