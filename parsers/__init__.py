"""Sans-I/O provider registry, usage parsers and pricing. Never imports Twisted.

C{analyse(Exchange) -> UsageRecord} is the whole interface the proxy
needs; it is thread-safe and never raises. C{load_user_prices(path)} adds
or overrides prices (also read once from C{$LLMOBSERVE_PRICES}).
"""

from ._analyse import analyse
from ._records import Exchange, UsageRecord, construct
from ._worstcase import WorstCase, worst_case, worst_case_fields
from .graphql import graphql_figures
from .pricing import load_user_prices
from .registry import REGISTRY, Provider, ProviderRegistry, canonical_host

__all__ = [
    "REGISTRY",
    "Exchange",
    "Provider",
    "ProviderRegistry",
    "UsageRecord",
    "WorstCase",
    "analyse",
    "canonical_host",
    "construct",
    "graphql_figures",
    "load_user_prices",
    "worst_case",
    "worst_case_fields",
]
