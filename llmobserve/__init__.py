"""llmobserve: track the cost of every paid API call through a local proxy.

This module is the public SDK surface. Importing it never imports Twisted:
the proxy runs in its own process (see docs/SDK.md).

    import llmobserve
    llmobserve.observe()                      # reuse or start the local proxy
    with llmobserve.section("agent:researcher"):
        client.chat.completions.create(...)  # tracked, attributed to the section
"""

from llmobserve.sdk import (
    Observation,
    Section,
    customer,
    export_context,
    import_context,
    observe,
    properties,
    section,
    set_customer_id,
    set_property,
    set_run_id,
    set_tenant_id,
    shutdown,
)

__version__ = "0.1.0"

__all__ = [
    "Observation",
    "Section",
    "__version__",
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
