"""Price modifiers: what changes a call's bill beyond its token counts.

Each modifier that applies is recorded in the event's C{flags} as
C{pricing:<what>}, so a reader sees why a call cost what it did
(docs/EVENTS.md, docs/PRICES.md):

 - C{pricing:service_tier=flex|priority}: OpenAI's tiers, priced with
   genai-prices's variant (flagged by the parser);
 - C{pricing:long_context}: a prompt over the model's long-context
   threshold, priced at the higher tier (genai-prices's tiered prices);
 - C{pricing:<tool>=N}: N server-side tool calls billed per call
   (C{web_search}, Gemini's C{grounding}), priced at the model's own
   rate in genai-prices (its C{web_searches} unit), or
   C{pricing:<tool>=N,unpriced} when it has none for that model;
 - C{pricing:batch}: a Batch API call, priced with genai-prices's batch
   prices for the model where its data has them (C{processing: batch}),
   else at half the standard price (applied here).
"""

from __future__ import annotations

from decimal import Decimal

from ._draft import UsageDraft
from .pricing import PriceResult

__all__ = ["BATCH_FACTOR", "apply_modifiers"]

#: The Batch API's discount: OpenAI and Anthropic bill batch calls at half.
BATCH_FACTOR = Decimal("0.5")


def apply_modifiers(draft: UsageDraft, priced: PriceResult) -> PriceResult:
    """Flag the modifiers behind C{priced} and apply the batch discount."""
    for name in priced.modifiers:
        if not name.startswith("processing="):  # the batch: flagged below
            draft.flag(f"pricing:{name}")
    reported = (priced.price_ref or "").startswith("reported:")
    for tool, count in draft.tool_calls.items():
        if f"{tool}={count}" not in priced.modifiers:
            # a reported cost is the provider's whole bill, tool fees included
            draft.flag(f"pricing:{tool}={count}" + ("" if reported else ",unpriced"))
    if not draft.batch:
        return priced
    draft.flag("pricing:batch")
    if "processing=batch" in priced.modifiers:
        return PriceResult(priced.cost_usd, f"{priced.price_ref} (batch prices)", priced.breakdown)
    if priced.cost_usd is None or reported:
        return priced
    total = Decimal(repr(priced.cost_usd)) * BATCH_FACTOR
    breakdown = {
        k: float(Decimal(repr(v)) * BATCH_FACTOR) for k, v in (priced.breakdown or {}).items()
    }
    return PriceResult(
        float(total), f"{priced.price_ref} x0.5 (batch)", breakdown or None, priced.modifiers
    )
