"""Why the budget check refuses a call: the records behind a 402 or a 429.

L{BudgetRefusal} (a budget would pass its limit: 402 C{budget_exceeded})
and L{RateRefusal} (a calls or tokens per minute limit is reached: 429
C{rate_limited}, with C{Retry-After}) give the relay the status, the error
kind, the message and the JSON detail of the answer (see
C{docs/BUDGETS.md}).
"""

from __future__ import annotations

from typing import Any

import attrs

from llmobserve.collector import Budget, RateLimit
from llmobserve.money import NANO_PER_USD, nano_up, usd_fixed

__all__ = ["BudgetRefusal", "RateRefusal"]


@attrs.frozen
class BudgetRefusal:
    """Why a call is refused: the budget, its window, spend and limit."""

    budget: Budget
    spend_usd: float
    reserved_usd: float
    worst_case_usd: float | None
    reason: str
    #: shared budgets: what the store granted this process (its spend and
    #: in-flight figures are its own); None when the limit itself refused
    share_usd: float | None = None
    #: a grant exchange may change the verdict (shared: refused by this
    #: process's share, or by the store's spend read with a limit that may
    #: since have been raised), so the relay waits for one and checks again
    may_grant: bool = False
    status: int = 402
    kind: str = "budget_exceeded"
    detail_key: str = "budget"
    retry_after: int | None = None

    def message(self) -> str:
        """The error message of the 402."""
        spend = usd_fixed(round(self.spend_usd, 8))
        reserved = usd_fixed(round(self.reserved_usd, 8))
        limit = usd_fixed(self.budget.limit_usd)
        if self.share_usd is None:
            held = f"spend ${spend} + in flight ${reserved} of limit ${limit}"
        else:
            held = (
                f"this process's spend ${spend} + in flight ${reserved} of its share"
                f" ${usd_fixed(round(self.share_usd, 8))} (limit ${limit}, shared with other"
                " processes: what they hold and do not spend is granted again)"
            )
        return (
            f"budget {self.budget.name!r} ({self.budget.window}) would be exceeded: "
            f"{held}; {self.reason}"
        )

    def detail(self) -> dict[str, Any]:
        """The C{budget} object of the 402's JSON body."""
        return {
            "name": self.budget.name,
            "window": self.budget.window,
            "tz": self.budget.tz,
            "spend_usd": self.spend_usd,
            "reserved_usd": self.reserved_usd,
            "limit_usd": self.budget.limit_usd,
            "worst_case_usd": _as_held(self.worst_case_usd),
            **({} if self.share_usd is None else {"share_usd": self.share_usd}),
        }


@attrs.frozen
class RateRefusal:
    """A call refused by a rate limit: 429, retry after the minute ends."""

    rule: RateLimit
    used: int
    reserved: int
    wanted: int | None
    retry_after: int
    #: refused for want of this process's grant of a shared limit
    shared: bool = False
    status: int = 429
    kind: str = "rate_limited"
    detail_key: str = "limit"

    def message(self) -> str:
        """The error message of the 429."""
        wanted = "" if self.wanted is None else f"; this call needs up to {self.wanted}"
        share = ": this process's share" if self.shared else ""
        return (
            f"rate limit {self.rule.name!r} ({self.rule.per_minute} {self.rule.unit} per"
            f" minute){share} reached: {self.used} used + {self.reserved} in flight{wanted}"
        )

    def detail(self) -> dict[str, Any]:
        """The C{limit} object of the 429's JSON body."""
        return {
            "name": self.rule.name,
            "unit": self.rule.unit,
            "per_minute": self.rule.per_minute,
            "used": self.used,
            "reserved": self.reserved,
            "retry_after_s": self.retry_after,
        }


def _as_held(usd: float | None) -> float | None:
    """A worst case as the ledger holds it: rounded up to the nano-dollar
    (C{0.0001989}, not the product's C{0.00019890000000000002})."""
    return None if usd is None else nano_up(usd) / NANO_PER_USD
