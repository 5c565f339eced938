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


def __getattr__(name: str) -> str:
    """C{__version__}, read from the installed distribution on first use (PEP 562):
    C{importlib.metadata} costs ~0.2 s to import, which the SDK does not make
    every C{import llmobserve} pay."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("llmobserve")
    except PackageNotFoundError:  # a source tree on sys.path, never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found


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
