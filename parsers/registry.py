"""The provider registry: which hosts speak which paid API.

The single source that the proxy's base-URL mode and default allowlist and
the SDK's routing all read. Matching is on the canonical host (lower case,
no trailing dot), exact or as a suffix on a label boundary, never a
substring of the URL.

Host patterns: an exact name (C{api.openai.com}); C{*.suffix}, one or more
whole labels before the suffix (C{*.pinecone.io}); and, for names with a
region in them, a pattern of the same label count in which a C{*} label
matches any one label and a C{*-x} label any label ending in C{-x}
(C{bedrock-runtime.*.amazonaws.com}, C{*-aiplatform.googleapis.com}).
Membership test for an allowlist: C{REGISTRY.for_host(host) is not None}.
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
    #: The provider id genai-prices knows this provider by (None: not an LLM seller there).
    prices_id: str | None = None

    def matches(self, host: str) -> bool:
        """True when the canonical C{host} is one of this provider's hosts."""
        return any(_host_matches(pattern, host) for pattern in self.hosts)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    if "*" in pattern:
        return _labels_match(pattern.split("."), host.split("."))
    return host == pattern


def _labels_match(pattern: list[str], labels: list[str]) -> bool:
    """Label-by-label match with one-label wildcards (C{*}, C{*-suffix})."""
    if len(pattern) != len(labels):
        return False
    for want, got in zip(pattern, labels, strict=True):
        if not got:
            return False
        if want == "*":
            continue
        if want.startswith("*"):
            if not (got.endswith(want[1:]) and len(got) > len(want) - 1):
                return False
        elif want != got:
            return False
    return True


@dataclass
class ProviderRegistry:
    """An ordered set of providers with host lookup."""

    providers: tuple[Provider, ...]
    _by_id: dict[str, Provider] = field(init=False, repr=False)
    _exact: dict[str, Provider] = field(init=False, repr=False)
    _suffixes: tuple[tuple[str, Provider], ...] = field(init=False, repr=False)
    _label_patterns: tuple[tuple[str, Provider], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.providers}
        self._exact = {}
        suffixes: list[tuple[str, Provider]] = []
        labelled: list[tuple[str, Provider]] = []
        for p in self.providers:
            for pattern in p.hosts:
                if pattern.startswith("*."):
                    suffixes.append((pattern[1:], p))
                elif "*" in pattern:
                    labelled.append((pattern, p))
                else:
                    self._exact.setdefault(pattern, p)
        self._label_patterns = tuple(labelled)
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
        for pattern, provider in self._label_patterns:
            if _host_matches(pattern, host):
                return provider
        for suffix, provider in self._suffixes:
            if host.endswith(suffix) and len(host) > len(suffix):
                return provider
        return None

    def base_url(self, provider_id: str) -> str | None:
        """The fixed public base URL of a provider, for base-URL mode."""
        p = self._by_id.get(provider_id)
        return None if p is None else p.base_url

    def ids(self) -> frozenset[str]:
        """Every provider id."""
        return frozenset(self._by_id)

    def host_patterns(self) -> Iterable[str]:
        """Every host pattern of every provider (the default allowlist)."""
        for p in self.providers:
            yield from p.hosts


def _p(
    id: str,
    kind: str,
    hosts: tuple[str, ...],
    base_url: str | None,
    parser: str,
    prices_id: str | None = None,
) -> Provider:
    return Provider(id, kind, hosts, base_url, parser, prices_id)


REGISTRY = ProviderRegistry(
    (
        # LLM APIs (OpenAI-compatible ones use the "openai" parser)
        _p("openai", "llm", ("api.openai.com",), "https://api.openai.com", "openai", "openai"),
        _p(
            "azure_openai",
            "llm",
            ("*.openai.azure.com", "*.cognitiveservices.azure.com", "*.services.ai.azure.com"),
            None,
            "openai",
            "azure",
        ),
        _p(
            "anthropic",
            "llm",
            ("api.anthropic.com",),
            "https://api.anthropic.com",
            "anthropic",
            "anthropic",
        ),
        _p(
            "gemini",
            "llm",
            ("generativelanguage.googleapis.com",),
            "https://generativelanguage.googleapis.com",
            "gemini",
            "google",
        ),
        _p(
            "vertex_ai",
            "llm",
            ("aiplatform.googleapis.com", "*-aiplatform.googleapis.com"),
            "https://aiplatform.googleapis.com",
            "gemini",
            "google",
        ),
        _p(
            "bedrock",
            "llm",
            ("bedrock-runtime.*.amazonaws.com", "bedrock-runtime-fips.*.amazonaws.com"),
            None,
            "bedrock",
            "aws",
        ),
        _p(
            "cohere",
            "llm",
            ("api.cohere.com", "api.cohere.ai"),
            "https://api.cohere.com",
            "cohere",
            "cohere",
        ),
        _p("mistral", "llm", ("api.mistral.ai",), "https://api.mistral.ai", "openai", "mistral"),
        _p("groq", "llm", ("api.groq.com",), "https://api.groq.com", "openai", "groq"),
        _p(
            "deepseek",
            "llm",
            ("api.deepseek.com",),
            "https://api.deepseek.com",
            "openai",
            "deepseek",
        ),
        _p("xai", "llm", ("api.x.ai",), "https://api.x.ai", "openai", "x-ai"),
        _p(
            "together",
            "llm",
            ("api.together.xyz", "api.together.ai"),
            "https://api.together.xyz",
            "openai",
            "together",
        ),
        _p(
            "fireworks",
            "llm",
            ("api.fireworks.ai",),
            "https://api.fireworks.ai",
            "openai",
            "fireworks",
        ),
        _p(
            "openrouter", "llm", ("openrouter.ai",), "https://openrouter.ai", "openai", "openrouter"
        ),
        _p(
            "perplexity",
            "llm",
            ("api.perplexity.ai",),
            "https://api.perplexity.ai",
            "openai",
            "perplexity",
        ),
        _p("ai21", "llm", ("api.ai21.com",), "https://api.ai21.com", "openai"),
        _p(
            "cerebras", "llm", ("api.cerebras.ai",), "https://api.cerebras.ai", "openai", "cerebras"
        ),
        _p(
            "nvidia",
            "llm",
            ("integrate.api.nvidia.com",),
            "https://integrate.api.nvidia.com",
            "openai",
        ),
        _p(
            "moonshot",
            "llm",
            ("api.moonshot.ai", "api.moonshot.cn"),
            "https://api.moonshot.ai",
            "openai",
            "moonshotai",
        ),
        _p(
            "huggingface",
            "llm",
            (
                "router.huggingface.co",
                "api-inference.huggingface.co",
                "*.endpoints.huggingface.cloud",
            ),
            "https://router.huggingface.co",
            "huggingface",
        ),
        _p(
            "replicate",
            "model_hosting",
            ("api.replicate.com",),
            "https://api.replicate.com",
            "replicate",
        ),
        # Embeddings
        _p(
            "voyage",
            "embedding",
            ("api.voyageai.com",),
            "https://api.voyageai.com",
            "openai",
            "voyageai",
        ),
        # Speech
        _p(
            "elevenlabs",
            "speech",
            ("api.elevenlabs.io", "api.us.elevenlabs.io", "api.eu.residency.elevenlabs.io"),
            "https://api.elevenlabs.io",
            "elevenlabs",
        ),
        _p(
            "deepgram",
            "speech",
            ("api.deepgram.com", "api.eu.deepgram.com"),
            "https://api.deepgram.com",
            "deepgram",
        ),
        _p(
            "assemblyai",
            "speech",
            ("api.assemblyai.com", "api.eu.assemblyai.com"),
            "https://api.assemblyai.com",
            "assemblyai",
        ),
        _p("playht", "speech", ("api.play.ht",), "https://api.play.ht", "playht"),
        _p(
            "azure_speech",
            "speech",
            (
                "*.tts.speech.microsoft.com",
                "*.stt.speech.microsoft.com",
                "*.api.cognitive.microsoft.com",
            ),
            None,
            "azure_speech",
        ),
        _p("aws_polly", "speech", ("polly.*.amazonaws.com",), None, "aws_polly"),
        _p(
            "aws_transcribe",
            "speech",
            ("transcribe.*.amazonaws.com", "transcribestreaming.*.amazonaws.com"),
            None,
            "aws_transcribe",
        ),
        # Images and video
        _p("stability", "image", ("api.stability.ai",), "https://api.stability.ai", "stability"),
        _p("runway", "video", ("api.dev.runwayml.com",), "https://api.dev.runwayml.com", "runway"),
        # Vector and search databases
        _p(
            "pinecone",
            "vector_db",
            ("api.pinecone.io", "*.pinecone.io"),
            "https://api.pinecone.io",
            "pinecone",
        ),
        _p(
            "weaviate",
            "vector_db",
            ("*.weaviate.network", "*.weaviate.cloud", "*.weaviate.io"),
            None,
            "weaviate",
        ),
        _p("qdrant", "vector_db", ("*.cloud.qdrant.io",), None, "qdrant"),
        _p("zilliz", "vector_db", ("*.zillizcloud.com", "*.zilliz.com"), None, "zilliz"),
        _p(
            "chroma",
            "vector_db",
            ("api.trychroma.com", "*.trychroma.com"),
            "https://api.trychroma.com",
            "chroma",
        ),
        _p(
            "mongodb_atlas",
            "database",
            ("cloud.mongodb.com", "data.mongodb-api.com", "*.data.mongodb-api.com"),
            "https://cloud.mongodb.com",
            "mongodb_atlas",
        ),
        _p(
            "algolia",
            "search",
            ("*.algolia.net", "*.algolianet.com", "*.algolia.io"),
            None,
            "algolia",
        ),
        # Payments, messaging, backend
        _p(
            "stripe",
            "payments",
            ("api.stripe.com", "files.stripe.com"),
            "https://api.stripe.com",
            "stripe",
        ),
        _p(
            "paypal",
            "payments",
            ("api-m.paypal.com", "api-m.sandbox.paypal.com", "api.paypal.com"),
            "https://api-m.paypal.com",
            "paypal",
        ),
        _p("twilio", "messaging", ("api.twilio.com",), "https://api.twilio.com", "twilio"),
        _p("sendgrid", "messaging", ("api.sendgrid.com",), "https://api.sendgrid.com", "sendgrid"),
        _p("supabase", "backend", ("*.supabase.co", "api.supabase.com"), None, "supabase"),
    )
)
