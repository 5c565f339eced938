"""L{PricePlan}: one resolved price list compiled for fast, exact repeated use.

genai-prices computes a price by decomposing usage into leaf units (a
unit's count minus its priced descendants'), multiplying each by its
price and dividing by the unit's C{per}, in Decimal. A plan does the same
arithmetic in the same order, with everything that depends only on the
price list (units, descendants, validity) worked out once. Tests check
that a plan's answer is exactly C{genai_prices.calc_price}'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from itertools import combinations
from typing import Any

from genai_prices._usage import subtract_usage_values
from genai_prices.data_units import unit_data
from genai_prices.types import ModelPrice, TieredPrices, calc_unit_price
from genai_prices.units import UnitDef, UnitRegistry
from genai_prices.validation import validate_priced_units

__all__ = ["REGISTRY_UNITS", "TO_GENAI", "InvalidUsage", "PlanTotals", "PricePlan"]

#: The unit registry genai-prices prices with (built from its own unit data).
REGISTRY_UNITS = UnitRegistry(unit_data)

#: Our usage keys (DESIGN.md) and the genai-prices usage keys they price as.
TO_GENAI = {
    "input_tokens": "input_tokens",
    "cached_input_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "cache_write_1h_tokens": "cache_write_1h_tokens",
    "output_tokens": "output_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
    "audio_input_tokens": "input_audio_tokens",
    "audio_output_tokens": "output_audio_tokens",
    "audio_seconds": "audio_seconds",
    "characters": "input_characters",
}
_MAPPED_UNITS = [REGISTRY_UNITS.units[k] for k in TO_GENAI.values()]

PlanTotals = tuple[Decimal, Decimal, Decimal]  # total, input, output

_ZERO = Decimal(0)


class InvalidUsage(ValueError):
    """Usage that genai-prices would refuse for this price list (it raises ValueError too)."""


def _descends(ancestor: UnitDef, unit: UnitDef) -> bool:
    return ancestor.dimensions.items() <= unit.dimensions.items()


class PricePlan:
    """A compiled price list; L{totals} prices one usage mapping (genai usage keys)."""

    __slots__ = (
        "_invalid",
        "_leaf_order",
        "_missing_guards",
        "_priced",
        "_requests",
        "_tiered",
        "_unguarded",
        "min_audio_seconds",
        "priced_keys",
        "tier_start",
    )

    def __init__(self, model_price: ModelPrice, min_audio_seconds: int = 0) -> None:
        priced: list[tuple[UnitDef, Decimal | TieredPrices, str | None]] = []
        for key, value in vars(model_price).items():
            if key.startswith("_") or value is None:
                continue
            try:
                unit = REGISTRY_UNITS.unit_for_price_key(key)
            except KeyError:
                continue  # genai-prices warns and skips unknown price keys too
            priced.append((unit, value, unit.dimensions.get("direction")))
        self._priced = tuple(priced)
        #: The genai usage keys this plan puts a price on.
        self.priced_keys = frozenset(u.usage_key for u, _, _ in priced)
        self._invalid: str | None = None
        try:
            validate_priced_units([u for u, _, _ in priced], REGISTRY_UNITS)
        except ValueError as exc:
            self._invalid = str(exc)
        self._tiered = any(isinstance(p, TieredPrices) for _, p, _ in priced)
        #: The fewest input tokens a higher (long-context) price tier starts above, or None.
        self.tier_start: int | None = min(
            (t.start for _, p, _ in priced if isinstance(p, TieredPrices) for t in p.tiers),
            default=None,
        )
        self._requests = any(u.usage_key == "requests" for u, _, _ in priced)
        units = [u for u, _, _ in priced if u.usage_key != "requests"]
        order = sorted(units, key=lambda u: (-len(u.dimensions), u.usage_key))
        self._leaf_order = tuple(
            (u.usage_key, tuple(d.usage_key for d in order if d is not u and _descends(u, d)))
            for u in order
        )
        # When a priced key is not reported, genai-prices infers 0 unless a
        # reported key makes that ambiguous (then it raises): precompute when.
        guards: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {}
        keys = [
            *(u for u in units),
            *([REGISTRY_UNITS.units["input_tokens"]] if self._tiered else []),
        ]
        for unit in keys:
            desc = tuple(m.usage_key for m in _MAPPED_UNITS if m is not unit and _descends(unit, m))
            pairs = tuple(
                (a.usage_key, b.usage_key)
                for a, b in combinations(sorted(_MAPPED_UNITS, key=lambda x: x.usage_key), 2)
                if a.is_compatible_with(b)
                and not (_descends(a, b) or _descends(b, a))
                and dict(unit.dimensions) == {**a.dimensions, **b.dimensions}
            )
            guards[unit.usage_key] = (desc, pairs)
        self._missing_guards = guards
        #: Keys whose absence can never be ambiguous: missing means 0, no checks.
        self._unguarded = frozenset(
            u.usage_key for u, _, _ in priced if guards.get(u.usage_key, ((), ())) == ((), ())
        )
        self.min_audio_seconds = min_audio_seconds

    def _value(self, usage: Mapping[str, Any], key: str) -> Any:
        value = usage.get(key)
        if value is not None:
            return value
        desc, pairs = self._missing_guards.get(key, ((), ()))
        for d in desc:
            if usage.get(d, 0) > 0:
                raise InvalidUsage(f"missing usage for {key}: {d} reported")
        for a, b in pairs:
            if usage.get(a, 0) > 0 and usage.get(b, 0) > 0:
                raise InvalidUsage(f"missing usage for {key}: {a} and {b} reported")
        return 0

    def totals(self, usage: Mapping[str, Any]) -> PlanTotals:
        """(total, input, output) USD; raises L{InvalidUsage} wherever genai-prices raises."""
        if self._invalid is not None:
            raise InvalidUsage(self._invalid)
        if self.min_audio_seconds:
            usage = dict(usage)
            seconds = usage.get("audio_seconds") or usage.get("input_audio_seconds")
            if seconds is not None:
                billed = max(seconds, self.min_audio_seconds) if seconds > 0 else 0
                usage["audio_seconds"] = usage["input_audio_seconds"] = billed
        leaves: dict[str, Any] = {}
        for key, descendants in self._leaf_order:
            value = usage.get(key)
            if value is None:
                value = 0 if key in self._unguarded else self._value(usage, key)
            if descendants:
                subtrahends = [leaves[d] for d in descendants]
                ints = type(value) is int
                for v in subtrahends:
                    if type(v) is not int:
                        ints = False
                        break
                if ints:
                    value -= sum(subtrahends)  # what subtract_usage_values does for ints
                else:
                    value = subtract_usage_values(value, subtrahends)
                if value < 0:
                    raise InvalidUsage(f"more specific usage exceeds {key}")
            leaves[key] = value
        if self._requests:
            leaves["requests"] = 1
        threshold = self._value(usage, "input_tokens") if self._tiered else 0
        total = input_ = output = _ZERO
        for unit, price, direction in self._priced:
            count = leaves[unit.usage_key]
            if not count:
                continue  # adds exactly zero: skip the Decimal work
            if type(count) is int and type(price) is Decimal:
                # calc_unit_price's own arithmetic for a flat price and an int count
                amount = price * Decimal(count) / unit.per
            else:
                amount = calc_unit_price(price, count, threshold, unit.per)
            total += amount
            if direction == "input":
                input_ += amount
            elif direction == "output":
                output += amount
        return total, input_, output
