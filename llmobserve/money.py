"""Amounts of money as a person reads them: fixed notation, never C{7.2e-06}."""

from __future__ import annotations

import math
from decimal import Decimal

__all__ = ["NANO_PER_USD", "nano_up", "usd_fixed"]

#: budgets count money in whole nano-dollars (exact sums)
NANO_PER_USD = 1_000_000_000


def usd_fixed(value: float | int) -> str:
    """C{value} in fixed notation with the digits of its shortest repr.

    C{7.2e-06} is C{"0.0000072"}, C{0.000108} stays C{"0.000108"}, C{3.0}
    is C{"3"}: no rounding, no exponent, no trailing zeros.
    """
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def nano_up(usd: float) -> int:
    """C{usd} in whole nano-dollars, rounded up (a worst case is never held
    short), forgiving the float noise of a product (C{0.0001989} is 198,900)."""
    return math.ceil(usd * NANO_PER_USD - 1e-6)
