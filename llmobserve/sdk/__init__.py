"""The client side of llmobserve: context, HTTP-library hooks, auto-start, spans.

The public API is re-exported by L{llmobserve} from here; the modules here
are private. Nothing in this package imports Twisted.
"""

from llmobserve.sdk._context import (
    Section,
    customer,
    export_context,
    import_context,
    properties,
    section,
    set_customer_id,
    set_property,
    set_run_id,
    set_tenant_id,
)
from llmobserve.sdk._observe import Observation, observe, shutdown

__all__ = [
    "Observation",
    "Section",
    "customer",
    "export_context",
    "import_context",
    "observe",
    "properties",
    "section",
    "set_customer_id",
    "set_property",
    "set_run_id",
    "set_tenant_id",
    "shutdown",
]
