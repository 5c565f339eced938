"""Checking the provider ids a user types (C{--base-url}, C{--provider-host},
C{observe(provider_hosts=...)}) against the registry.

A misspelt id used to be accepted and its calls recorded as C{unknown},
unpriced: refusing it at once, naming the closest valid id, costs the user
one retry instead of a day of untracked spend.
"""

from __future__ import annotations

import difflib

__all__ = ["UnknownProviderError", "check_provider_id"]


class UnknownProviderError(ValueError):
    """A provider id that is not in the registry (the message names the closest one)."""


def check_provider_id(provider_id: str, where: str) -> str:
    """C{provider_id} if the registry knows it; else raise L{UnknownProviderError}.

    @param where: what the id came from, for the message (C{"--base-url"};
        empty where the caller says it, as argparse does).
    """
    from parsers.registry import REGISTRY

    known = REGISTRY.ids()
    if provider_id in known:
        return provider_id
    close = difflib.get_close_matches(provider_id.lower(), sorted(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see parsers/registry.py for the ids"
    prefix = f"{where}: " if where else ""
    raise UnknownProviderError(f"{prefix}unknown provider {provider_id!r}; {hint}")
