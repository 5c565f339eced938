"""Prices: genai-prices for models it knows, our own table for the rest, user files on top.

Order of precedence for one call: a cost the API itself reported; a
user price file (the last loaded wins); llmobserve's table
(C{parsers/data/prices.json}); genai-prices (pinned), at the request's
own date. No price gives C{cost_usd=None} and a C{price_ref} saying why.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources

from ._genai import GenaiResolver
from ._plan import TO_GENAI, InvalidUsage, PlanTotals
from ._table import PriceEntry, PriceTable, PriceTableError, parse_table

__all__ = ["PRICER", "PriceResult", "PriceTableError", "Pricer", "load_user_prices"]

_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
#: Claude prompts over this many tokens are billed at long-context rates.
_CLAUDE_LONG = 200_000


@dataclass(frozen=True)
class PriceResult:
    """A cost in USD (or None), where it came from, and its input/output split."""

    cost_usd: float | None
    price_ref: str | None
    breakdown: Mapping[str, float] | None = None
    #: Price modifiers the price list applied (C{long_context}: the higher tier).
    modifiers: tuple[str, ...] = ()


def _builtin_table() -> PriceTable:
    text = resources.files("parsers").joinpath("data/prices.json").read_text("utf-8")
    return PriceTable(parse_table(text, "llmobserve"))


class Pricer:
    """Prices usage; thread-safe (tables are swapped whole, caches are atomic dicts)."""

    def __init__(self) -> None:
        self._genai = GenaiResolver()
        self._builtin = _builtin_table()
        self._user: tuple[PriceTable, ...] = ()
        self._tables: tuple[PriceTable, ...] = (self._builtin,)  # user files first
        self._lock = threading.Lock()
        self._days: dict[int, str] = {}

    def load_user_prices(self, path: str) -> int:
        """Add a user price file (JSON or TOML); later files win. Returns its entry count."""
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        fmt = "toml" if path.lower().endswith(".toml") else "json"
        table = PriceTable(parse_table(text, "user", fmt))
        with self._lock:
            self._user = (table, *self._user)
            self._tables = (*self._user, self._builtin)
        return len(table)

    def clear_user_prices(self) -> None:
        """Forget every user price file (for tests and reloads)."""
        with self._lock:
            self._user = ()
            self._tables = (self._builtin,)

    def _day(self, when: float) -> str:
        day = int(when // 86400)
        text = self._days.get(day)
        if text is None:
            text = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
            if len(self._days) > 1024:
                self._days = {}
            self._days[day] = text
        return text

    def price(
        self,
        provider_id: str,
        prices_id: str | None,
        model: str | None,
        usage: Mapping[str, int | float],
        when: float,
        *,
        item: str | None = None,
        context: Mapping[str, str] | None = None,
        use_genai: bool = True,
        tool_calls: Mapping[str, int] | None = None,
    ) -> PriceResult:
        """Price C{usage} of C{model} at C{provider_id} at unix time C{when}.

        C{tool_calls} (server-side searches, by tool) are priced at the
        model's own per-call rate when genai-prices has one (its
        C{web_searches} unit); the result's C{modifiers} then name them.
        """
        if not usage:
            return PriceResult(None, "no usage reported")
        for table in self._tables:
            entry = table.lookup(provider_id, model, when)
            if entry is not None:
                result = self._entry_price(entry, provider_id, usage, item)
                if result is not None:
                    return result
        if model is None:
            return PriceResult(None, f"no price for {provider_id} (no model named)")
        if use_genai:
            found = self._genai.plan(prices_id, model, when, context)
            if found is not None:
                day = found.day or self._day(when)
                ref = f"genai-prices:{found.provider_id}/{found.model_id}@{day}"
                if not found.plan.priced_keys:
                    return PriceResult(0.0, ref + " (free)")
                genai_usage = {TO_GENAI[k]: v for k, v in usage.items() if k in TO_GENAI}
                if not (
                    found.plan.priced_keys & genai_usage.keys()
                ) and not found.plan.priced_keys & {"requests"}:
                    return PriceResult(None, f"{ref} prices none of {sorted(usage)}")
                modifiers: list[str] = []
                if tool_calls and "web_searches" in found.plan.priced_keys:
                    genai_usage["web_searches"] = sum(tool_calls.values())
                    modifiers += [f"{tool}={n}" for tool, n in tool_calls.items()]
                    ref += " + " + ", ".join(f"{n} {tool}" for tool, n in tool_calls.items())
                try:
                    totals = found.plan.totals(genai_usage)
                except InvalidUsage as exc:
                    return PriceResult(None, f"{ref}: invalid usage ({exc})")
                tiered = found.plan.tier_start
                prompt = usage.get("input_tokens", 0)
                if tiered is not None and prompt > tiered:
                    modifiers.append("long_context")
                elif (
                    tiered is None and prompt > _CLAUDE_LONG and found.model_id.startswith("claude")
                ):
                    # Anthropic bills every prompt over 200k at its long-context
                    # rates; the data lacks them for this model (Sonnet 4)
                    modifiers.append("long_context,unpriced")
                for key, value in (context or {}).items():
                    if key in found.unmatched_context:  # e.g. flex before the data has it
                        modifiers.append(f"{key}={value},unpriced")
                    elif key == "processing":  # the data's own batch prices applied
                        modifiers.append(f"{key}={value}")
                return _result(totals, ref, tuple(modifiers), tools="web_searches" in genai_usage)
        if not use_genai:
            return PriceResult(None, f"no sourced price for {provider_id}/{model[:200]}")
        return PriceResult(None, f"unknown model: {model[:200]}")

    def _entry_price(
        self,
        entry: PriceEntry,
        provider_id: str,
        usage: Mapping[str, int | float],
        item: str | None,
    ) -> PriceResult | None:
        name = entry.model if entry.model != "*" else None
        ref = f"{entry.origin}:{provider_id}/"
        if entry.free:
            return PriceResult(0.0, ref + (name or "*") + " (free)")
        total = input_ = output = _ZERO
        used: list[str] = []
        if entry.plan is not None:
            genai_usage = {TO_GENAI[k]: v for k, v in usage.items() if k in TO_GENAI}
            if entry.plan.priced_keys & genai_usage.keys():
                try:
                    total, input_, output = entry.plan.totals(genai_usage)
                except InvalidUsage as exc:
                    return PriceResult(None, f"{ref}{name or '*'}: invalid usage ({exc})")
                used += [k for k in usage if k in TO_GENAI]
        own = entry.own
        for price_key, usage_key, per in (
            ("read_munits", "read_units", _MILLION),
            ("write_munits", "write_units", _MILLION),
            ("per_image", "images", Decimal(1)),
        ):
            if price_key in own and usage_key in usage:
                total += own[price_key] * Decimal(repr(usage[usage_key])) / per
                used.append(usage_key)
        if "per_request" in own:
            total += own["per_request"] * Decimal(repr(usage.get("requests", 1)))
            used.append("requests")
        if entry.items and item is not None and item in entry.items:
            unit = entry.item_unit
            quantity = 1 if unit == "call" else usage.get(unit)
            if quantity is not None:
                total += entry.items[item] * Decimal(repr(quantity))
                used.append(item)
        if not used:
            return None  # this entry prices nothing this call used: look further
        label = name or "+".join(dict.fromkeys(used))
        if item is not None and item in entry.items:
            label += f" ({item})"
        breakdown = {"input": float(input_), "output": float(output)} if entry.plan else None
        return PriceResult(float(total), ref + label, breakdown)


def _result(
    totals: PlanTotals, ref: str, modifiers: tuple[str, ...] = (), *, tools: bool = False
) -> PriceResult:
    total, input_, output = totals
    breakdown = {"input": float(input_), "output": float(output)}
    if tools:  # per-call tool fees have no direction: what is left of the total
        breakdown["tools"] = float(total - input_ - output)
    return PriceResult(float(total), ref, breakdown, modifiers)


PRICER = Pricer()


def load_user_prices(path: str) -> None:
    """Add or override prices from a user file (format: docs/PRICES.md)."""
    PRICER.load_user_prices(path)


def _load_from_environment() -> None:
    path = os.environ.get("LLMOBSERVE_PRICES")
    if path:
        # A bad price file is a configuration error: say so at start-up, loudly.
        try:
            PRICER.load_user_prices(path)
        except (OSError, PriceTableError) as exc:
            raise PriceTableError(f"LLMOBSERVE_PRICES={path}: {exc}") from exc


_load_from_environment()
