"""Price modifiers: what changes a call's bill beyond its token counts.

Applied by L{parsers.analyse} to the price of the usage. Each modifier
that applies is recorded in the event's C{flags} as C{pricing:<what>},
so a reader sees why a call cost what it did (docs/EVENTS.md):

 - C{pricing:service_tier=flex|priority}: OpenAI's tiers, priced with
   genai-prices's variant (set by the parser, not here);
 - C{pricing:long_context}: a prompt over the model's long-context
   threshold, priced at the higher tier (genai-prices's tiered prices);
 - C{pricing:batch}: a Batch API call, billed at half price;
 - C{pricing:<tool>=N}: N server-side tool calls billed per call, their
   fee added (C{web_search}) or, where no per-call fee can be stated,
   C{pricing:<tool>=N,unpriced} (Gemini grounding: free up to a daily
   allowance the proxy cannot see).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from ._draft import UsageDraft
from .pricing import PriceResult

__all__ = ["BATCH_FACTOR", "TOOL_FEES", "apply_modifiers"]

#: The Batch API's discount: OpenAI and Anthropic bill batch calls at half.
BATCH_FACTOR = Decimal("0.5")

#: USD per call of a server-side tool, by (provider, tool), with its source.
TOOL_FEES: Mapping[tuple[str, str], tuple[Decimal, str]] = {
    # "$10 per 1,000 searches, plus standard token costs" (Anthropic's web
    # search tool documentation, as quoted in copies of it from 2025-06 to
    # 2026; checked 2026-12-07).
    ("anthropic", "web_search"): (
        Decimal("0.01"),
        "https://platform.claude.com/docs/en/agents-and-tools/tool-use/web-search-tool",
    ),
}


def apply_modifiers(provider_id: str, draft: UsageDraft, priced: PriceResult) -> PriceResult:
    """C{priced} with the batch discount and per-call tool fees applied."""
    if draft.batch:
        draft.flag("pricing:batch")
    for tool, count in draft.tool_calls.items():
        fee = TOOL_FEES.get((provider_id, tool))
        draft.flag(f"pricing:{tool}={count}" + ("" if fee else ",unpriced"))
    if priced.cost_usd is None or (priced.price_ref or "").startswith("reported:"):
        return priced  # nothing to adjust, or the provider's own bill already has it all
    total = Decimal(repr(priced.cost_usd))
    breakdown = dict(priced.breakdown or {})
    ref = priced.price_ref or ""
    if draft.batch:
        total *= BATCH_FACTOR
        breakdown = {k: float(Decimal(repr(v)) * BATCH_FACTOR) for k, v in breakdown.items()}
        ref += " x0.5 (batch)"
    for tool, count in draft.tool_calls.items():
        fee = TOOL_FEES.get((provider_id, tool))
        if fee is None or not count:
            continue
        amount = fee[0] * count
        total += amount
        breakdown["tools"] = breakdown.get("tools", 0.0) + float(amount)
        ref += f" + {tool} {count} x ${fee[0]}"
    if ref == priced.price_ref:
        return priced
    return PriceResult(float(total), ref, breakdown or None)
