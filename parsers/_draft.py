"""The mutable scratch record one parse fills in, and the number helpers it uses.

A L{UsageDraft} lives for one call on one thread and is frozen into a
L{parsers.UsageRecord} at the end; nothing else ever holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["UsageDraft", "as_count", "as_number", "get_path"]

#: The event's usage keys (DESIGN.md), in display order.
USAGE_KEYS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
    "images",
    "audio_seconds",
    "characters",
    "read_units",
    "write_units",
    "requests",
)

_MAX_COUNT = 1 << 53  # beyond exact float range: not a real usage figure


def as_count(value: object) -> int | None:
    """A non-negative integer count from a JSON value, or None.

    Accepts ints, integral floats and digit strings (some APIs quote
    numbers); refuses bools, negatives, NaN/inf and absurd magnitudes.
    """
    if type(value) is int:  # the usual case first (a bool's type is bool)
        return value if 0 <= value < _MAX_COUNT else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < _MAX_COUNT else None
    if isinstance(value, float):
        if math.isfinite(value) and 0 <= value < _MAX_COUNT and value == int(value):
            return int(value)
        return None
    if isinstance(value, str) and 0 < len(value) <= 16 and value.isdigit():
        return int(value)
    return None


def as_number(value: object) -> float | None:
    """A finite non-negative number (int or float, or numeric string), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if 0 <= value < _MAX_COUNT else None
    if isinstance(value, float):
        return value if math.isfinite(value) and 0 <= value < _MAX_COUNT else None
    if isinstance(value, str) and 0 < len(value) <= 32:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) and 0 <= number < _MAX_COUNT else None
    return None


def get_path(obj: object, *keys: str) -> Any:
    """C{obj[k1][k2]...} through dicts only, or None."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


@dataclass
class UsageDraft:
    """What a provider parser found; priced and frozen by the caller."""

    endpoint: str | None = None
    model: str | None = None
    request_model: str | None = None
    response_id: str | None = None
    streamed: bool = False
    usage: dict[str, int | float] = field(default_factory=dict)
    reported: bool = False
    estimated_keys: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    parse_error: str | None = None
    #: A cost the API itself reported, in USD (OpenRouter, Perplexity, Twilio).
    reported_cost_usd: float | None = None
    reported_cost_ref: str | None = None
    #: genai-prices price context (e.g. service_tier) for price variants.
    price_context: dict[str, str] = field(default_factory=dict)
    #: The key our own price table is looked up with when it differs from the model.
    price_item: str | None = None
    #: Why no price applies (e.g. "no per-request price"), when that is known up front.
    unpriced_reason: str | None = None
    graphql: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: A Batch API call (billed at half price: L{parsers._modifiers}).
    batch: bool = False
    #: Server-side tool calls billed per call, by tool (C{web_search}, C{grounding}).
    tool_calls: dict[str, int] = field(default_factory=dict)

    def set(self, key: str, value: object) -> None:
        """Record a reported count when it is a valid number (ignore otherwise)."""
        if type(value) is int and 0 <= value < _MAX_COUNT:  # as_count's usual case
            self.usage[key] = value
            self.reported = True
            return
        count = as_count(value)
        if count is not None:
            self.usage[key] = count
            self.reported = True
        elif (number := as_number(value)) is not None:
            self.usage[key] = number
            self.reported = True

    def estimate(self, key: str, value: int | float) -> None:
        """Record an estimated count (marked so in C{estimated_keys})."""
        if value >= 0 and math.isfinite(value):
            self.usage[key] = value
            if key not in self.estimated_keys:
                self.estimated_keys.append(key)

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def error(self, reason: str) -> None:
        """Keep the first parse error (the later ones are usually its echoes)."""
        if self.parse_error is None:
            self.parse_error = reason[:200]

    @property
    def usage_source(self) -> str:
        if not self.usage:
            return "missing"
        if self.estimated_keys and not self.reported:
            return "estimated"
        return "reported" if self.reported else "estimated"
