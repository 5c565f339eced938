"""The provider registry: which hosts speak which paid API.

The single source that the proxy's base-URL mode and default allowlist and
the SDK's routing all read. Matching is on the canonical host (lower case,
no trailing dot), exact or as a suffix on a label boundary, never a
substring of the URL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["REGISTRY", "Provider", "ProviderRegistry", "canonical_host"]


def canonical_host(host: str) -> str:
    """Lower-case, strip one trailing dot and IPv6 brackets."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


@dataclass(frozen=True)
class Provider:
    """One provider: its id (the event's C{provider}), kind, hosts and parser.

    C{hosts} holds exact names (C{api.openai.com}) and suffix patterns
    (C{*.pinecone.io}, matching on a label boundary only). C{base_url} is the
    fixed public base URL that base-URL mode (C{/<id>/<rest>}) forwards to,
    or None when the provider has none (per-account hosts).
    """

    id: str
    kind: str
    hosts: tuple[str, ...]
    base_url: str | None = None
    parser: str = "generic"

    def matches(self, host: str) -> bool:
        """True when the canonical C{host} is one of this provider's hosts."""
        return any(_host_matches(pattern, host) for pattern in self.hosts)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass
class ProviderRegistry:
    """An ordered set of providers with host lookup."""

    providers: tuple[Provider, ...]
    _by_id: dict[str, Provider] = field(init=False, repr=False)
    _exact: dict[str, Provider] = field(init=False, repr=False)
    _suffixes: tuple[tuple[str, Provider], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.providers}
        self._exact = {}
        suffixes: list[tuple[str, Provider]] = []
        for p in self.providers:
            for pattern in p.hosts:
                if pattern.startswith("*."):
                    suffixes.append((pattern[1:], p))
                else:
                    self._exact.setdefault(pattern, p)
        # Longest suffix first, so the most specific pattern wins.
        self._suffixes = tuple(sorted(suffixes, key=lambda s: -len(s[0])))

    def __iter__(self) -> Iterator[Provider]:
        return iter(self.providers)

    def by_id(self, provider_id: str) -> Provider | None:
        """The provider with this id, or None."""
        return self._by_id.get(provider_id)

    def for_host(self, host: str) -> Provider | None:
        """The provider whose hosts include C{host} (canonicalised here), or None."""
        host = canonical_host(host)
        found = self._exact.get(host)
        if found is not None:
            return found
        for suffix, provider in self._suffixes:
            if host.endswith(suffix):
                return provider
        return None

    def base_url(self, provider_id: str) -> str | None:
        """The fixed public base URL of a provider, for base-URL mode."""
        p = self._by_id.get(provider_id)
        return None if p is None else p.base_url

    def ids(self) -> frozenset[str]:
        return frozenset(self._by_id)

    def host_patterns(self) -> Iterable[str]:
        """Every host pattern of every provider (the default allowlist)."""
        for p in self.providers:
            yield from p.hosts


REGISTRY = ProviderRegistry(
    (
        Provider("openai", "llm", ("api.openai.com",), "https://api.openai.com", "openai"),
        Provider("anthropic", "llm", ("api.anthropic.com",), "https://api.anthropic.com", "anthropic"),
        Provider(
            "gemini",
            "llm",
            ("generativelanguage.googleapis.com",),
            "https://generativelanguage.googleapis.com",
            "gemini",
        ),
        Provider("mistral", "llm", ("api.mistral.ai",), "https://api.mistral.ai", "openai"),
        Provider("groq", "llm", ("api.groq.com",), "https://api.groq.com", "openai"),
        Provider("cohere", "llm", ("api.cohere.com", "api.cohere.ai"), "https://api.cohere.com", "cohere"),
        Provider("deepseek", "llm", ("api.deepseek.com",), "https://api.deepseek.com", "openai"),
        Provider("together", "llm", ("api.together.xyz", "api.together.ai"), "https://api.together.xyz", "openai"),
        Provider("fireworks", "llm", ("api.fireworks.ai",), "https://api.fireworks.ai", "openai"),
        Provider("openrouter", "llm", ("openrouter.ai",), "https://openrouter.ai", "openai"),
        Provider("xai", "llm", ("api.x.ai",), "https://api.x.ai", "openai"),
        Provider("perplexity", "llm", ("api.perplexity.ai",), "https://api.perplexity.ai", "openai"),
        Provider("pinecone", "vector_db", ("api.pinecone.io", "*.pinecone.io"), None, "pinecone"),
    )
)
