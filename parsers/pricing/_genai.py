"""Resolving (provider, model, price date) against genai-prices, once each.

A genai-prices lookup (model matching, conditional prices) costs tens of
microseconds; the answer only changes with the model and the price date
(or the minute of day, for the few models with off-peak prices), so it is
cached as a compiled L{PricePlan}. Caches are bounded (model names come
from the network) and safe under threads: entries are immutable and dict
reads and writes are atomic; a race at worst compiles a plan twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from genai_prices import data_snapshot
from genai_prices.types import ModelInfo, ModelPrice, TimeOfDateConstraint
from genai_prices.types import Provider as GenaiProvider

from ._plan import PricePlan

__all__ = ["GenaiPlan", "GenaiResolver"]

_MAX_ENTRIES = 4096
_Found = tuple[GenaiProvider, ModelInfo, bool]  # provider, model, has time-of-day prices
_GROQ_WHISPER = frozenset({"whisper-large-v3", "whisper-large-v3-turbo"})


@dataclass(frozen=True)
class GenaiPlan:
    """A plan and the names it came from (for C{price_ref})."""

    plan: PricePlan
    provider_id: str
    model_id: str
    #: The UTC date (YYYY-MM-DD) the prices are taken at (a plan never spans two).
    day: str = ""
    #: Price context keys (C{service_tier}) that no price variant of the model
    #: matched at that date: the standard prices stand in for them.
    unmatched_context: tuple[str, ...] = ()


def _has_time_of_day(model: ModelInfo) -> bool:
    constraints: list[Any] = []
    if not isinstance(model.prices, ModelPrice):
        constraints += [c.constraint for c in model.prices]
    constraints += [v.constraint for v in model.price_variants or ()]
    return any(isinstance(c, TimeOfDateConstraint) for c in constraints)


def _unmatched(
    model: ModelInfo, stamp: datetime, ctx: tuple[tuple[str, str], ...]
) -> tuple[str, ...]:
    """The context keys no price variant of C{model} active at C{stamp} matches."""
    matched: set[str] = set()
    for variant in model.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(stamp):
            continue
        if all(dict(ctx).get(key) == value for key, value in variant.when.items()):
            matched.update(variant.when)
    return tuple(k for k, _ in ctx if k not in matched)


class GenaiResolver:
    """Finds and caches genai-prices plans."""

    def __init__(self) -> None:
        # (provider, model, has time-of-day prices), or None for a cached miss
        self._models: dict[tuple[str | None, str], _Found | None] = {}
        self._plans: dict[tuple[Any, ...], GenaiPlan] = {}
        self._snapshot: object = None

    def _check_snapshot(self) -> Any:
        snapshot = data_snapshot.get_snapshot()
        if snapshot is not self._snapshot:  # UpdatePrices swapped in new data
            self._models = {}
            self._plans = {}
            self._snapshot = snapshot
        return snapshot

    def find(self, prices_id: str | None, model_ref: str) -> tuple[GenaiProvider, ModelInfo] | None:
        """The genai-prices provider and model for C{model_ref}, or None."""
        found = self._find(prices_id, model_ref)
        return None if found is None else (found[0], found[1])

    def _find(self, prices_id: str | None, model_ref: str) -> _Found | None:
        snapshot = self._check_snapshot()
        key = (prices_id, model_ref)
        found = self._models.get(key, False)
        if found is not False:
            return found  # type: ignore[return-value]  # cached (possibly a cached miss)
        result: tuple[GenaiProvider, ModelInfo] | None = None
        try:
            result = snapshot.find_provider_model(model_ref, None, prices_id, None)
        except LookupError:
            if prices_id is not None:
                try:  # e.g. an aggregator naming another provider's model
                    result = snapshot.find_provider_model(model_ref, None, None, None)
                except LookupError:
                    result = None
        entry = None if result is None else (*result, _has_time_of_day(result[1]))
        if len(self._models) >= _MAX_ENTRIES:
            self._models = {}
        self._models[key] = entry
        return entry

    def plan(
        self,
        prices_id: str | None,
        model_ref: str,
        when: float,
        context: Mapping[str, str] | None,
    ) -> GenaiPlan | None:
        """The plan pricing C{model_ref} at unix time C{when}, or None when unknown."""
        found = self._find(prices_id, model_ref)
        if found is None:
            return None
        provider, model, time_of_day = found
        ctx = tuple(sorted(context.items())) if context else ()
        bucket = int(when // 60) if time_of_day else int(when // 86400)
        key = (provider.id, model.id, bucket, ctx)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        stamp = datetime.fromtimestamp(when, UTC)
        if ctx and not any(model is m for m in provider.models):
            model_price = model.get_prices(stamp)  # what genai-prices does for fallback models
            unmatched = tuple(k for k, _ in ctx)
        else:
            model_price = model.get_prices(stamp, dict(ctx) or None)
            unmatched = _unmatched(model, stamp, ctx)
        min_seconds = 10 if provider.id == "groq" and model.id in _GROQ_WHISPER else 0
        day = stamp.strftime("%Y-%m-%d")
        plan = PricePlan(model_price, min_seconds)
        result = GenaiPlan(plan, provider.id, model.id, day, unmatched)
        if len(self._plans) >= _MAX_ENTRIES:
            self._plans = {}
        self._plans[key] = result
        return result
