"""Our own price table (and users' overrides): what genai-prices lacks.

Entries, in JSON (or TOML), use genai-prices's units where one exists
(C{input_mtok}: USD per million input tokens, C{audio_hours},
C{input_mchars}, ...) and a few of our own:

  - C{read_munits}, C{write_munits}: USD per million read / write units;
  - C{per_request}: USD per C{requests} counted (1 per call when not counted);
  - C{per_image}: USD per image;
  - C{items} with C{item_unit} (C{images}, C{requests} or C{call}): USD per
    unit for a named variant (e.g. C{"hd/1024x1792"} for an image size);
  - C{free: true}: the call is free (cost 0, said so).

An entry names C{provider} (a registry id), C{model} (exact, C{prefix*}
or C{*}), and optionally C{start_date} (YYYY-MM-DD, UTC), C{source},
C{as_of} (YYYY-MM-DD: the date the source's figures are from),
C{checked_via}, C{note}. See docs/PRICES.md.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from genai_prices.types import ModelPrice

from ._plan import REGISTRY_UNITS, PricePlan

__all__ = ["PriceEntry", "PriceTable", "PriceTableError", "parse_table"]

_OWN_KEYS = frozenset({"read_munits", "write_munits", "per_request", "per_image"})
_ITEM_UNITS = frozenset({"images", "requests", "call"})


class PriceTableError(ValueError):
    """A price file that does not follow the format (the message says where)."""


@dataclass(frozen=True)
class PriceEntry:
    """One priced model (or provider-wide line) from a table."""

    provider: str
    model: str  # lower case; "*" or "prefix*" allowed
    origin: str  # "llmobserve" or "user"
    start: date | None = None
    plan: PricePlan | None = None  # genai-unit prices
    own: Mapping[str, Decimal] = field(default_factory=dict)
    items: Mapping[str, Decimal] = field(default_factory=dict)
    item_unit: str = "call"
    free: bool = False

    def specificity(self) -> tuple[int, int]:
        if self.model == "*":
            return (0, 0)
        if self.model.endswith("*"):
            return (1, len(self.model))
        return (2, len(self.model))

    def matches(self, model: str) -> bool:
        if self.model == "*":
            return True
        if self.model.endswith("*"):
            return model.startswith(self.model[:-1])
        return model == self.model


def _decimal(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PriceTableError(f"{where}: price must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise PriceTableError(f"{where}: price must be a number") from None
    if not number.is_finite() or number < 0:
        raise PriceTableError(f"{where}: price must be finite and >= 0")
    return number


def _entry(raw: object, origin: str, where: str) -> PriceEntry:
    if not isinstance(raw, dict):
        raise PriceTableError(f"{where}: an entry must be an object")
    provider = raw.get("provider")
    model = raw.get("model", "*")
    if not isinstance(provider, str) or not provider or not isinstance(model, str) or not model:
        raise PriceTableError(f"{where}: needs 'provider' and 'model' strings")
    start = None
    if raw.get("start_date") is not None:
        try:
            start = date.fromisoformat(str(raw["start_date"]))
        except ValueError:
            raise PriceTableError(f"{where}: start_date must be YYYY-MM-DD") from None
    if raw.get("as_of") is not None:
        try:
            date.fromisoformat(str(raw["as_of"]))
        except ValueError:
            raise PriceTableError(f"{where}: as_of must be YYYY-MM-DD") from None
    prices = raw.get("prices", {})
    if not isinstance(prices, dict):
        raise PriceTableError(f"{where}: 'prices' must be an object")
    genai: dict[str, Decimal] = {}
    own: dict[str, Decimal] = {}
    for key, value in prices.items():
        if key in _OWN_KEYS:
            own[key] = _decimal(value, f"{where}.prices.{key}")
            continue
        try:
            REGISTRY_UNITS.unit_for_price_key(key)
        except KeyError:
            raise PriceTableError(f"{where}: unknown price key {key!r}") from None
        genai[key] = _decimal(value, f"{where}.prices.{key}")
    items_raw = raw.get("items", {})
    if not isinstance(items_raw, dict):
        raise PriceTableError(f"{where}: 'items' must be an object")
    items = {str(k): _decimal(v, f"{where}.items.{k}") for k, v in items_raw.items()}
    item_unit = raw.get("item_unit", "call")
    if item_unit not in _ITEM_UNITS:
        raise PriceTableError(f"{where}: item_unit must be one of {sorted(_ITEM_UNITS)}")
    free = raw.get("free") is True
    if not (genai or own or items or free):
        raise PriceTableError(f"{where}: no prices")
    plan = PricePlan(ModelPrice(**genai)) if genai else None
    return PriceEntry(
        provider.lower(), model.lower(), origin, start, plan, own, items, str(item_unit), free
    )


def parse_table(text: str, origin: str, fmt: str = "json") -> list[PriceEntry]:
    """Entries from a price file's text (JSON or TOML: a top-level C{prices} list)."""
    try:
        doc: Any = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PriceTableError(f"not valid {fmt.upper()}: {exc}") from None
    entries = doc.get("prices") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise PriceTableError("expected a top-level 'prices' list")
    return [_entry(raw, origin, f"prices[{i}]") for i, raw in enumerate(entries)]


class PriceTable:
    """Entries indexed by provider; L{lookup} picks the most specific one in force."""

    def __init__(self, entries: list[PriceEntry]) -> None:
        by_provider: dict[str, list[PriceEntry]] = {}
        for entry in entries:
            by_provider.setdefault(entry.provider, []).append(entry)
        for items in by_provider.values():
            items.sort(key=lambda e: (e.specificity(), e.start or date.min), reverse=True)
        self._by_provider = by_provider
        # (provider, model) -> matching entries, most specific first; bounded,
        # since model names come from the network.
        self._matches: dict[tuple[str, str], tuple[PriceEntry, ...]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_provider.values())

    def has_provider(self, provider: str) -> bool:
        return provider in self._by_provider

    def lookup(self, provider: str, model: str | None, when: float) -> PriceEntry | None:
        """The entry for C{provider}/C{model} in force at unix time C{when}, or None."""
        if provider not in self._by_provider:
            return None
        name = (model or "*").lower()
        matching = self._matches.get((provider, name))
        if matching is None:
            matching = tuple(e for e in self._by_provider[provider] if e.matches(name))
            if len(self._matches) >= 4096:
                self._matches = {}
            self._matches[(provider, name)] = matching
        day: date | None = None
        for entry in matching:
            if entry.start is not None:
                if day is None:
                    day = datetime.fromtimestamp(when, UTC).date()
                if entry.start > day:
                    continue
            return entry
        return None
