"""The provider registry: coverage of DESIGN.md's ids and strict host matching."""

from __future__ import annotations

import pytest
from parsers_testkit import exchange

from parsers import REGISTRY, analyse, canonical_host

DESIGN_IDS = (
    "openai azure_openai anthropic gemini vertex_ai bedrock cohere mistral groq deepseek xai "
    "together fireworks openrouter perplexity ai21 huggingface replicate voyage elevenlabs "
    "deepgram assemblyai playht stability runway azure_speech aws_polly aws_transcribe pinecone "
    "weaviate qdrant zilliz chroma mongodb_atlas algolia stripe paypal twilio sendgrid supabase"
).split()


def test_every_design_provider_is_registered() -> None:
    """All 40 provider ids fixed by DESIGN.md exist, each with a kind, hosts and a parser."""
    assert len(REGISTRY.ids()) >= 40
    for pid in DESIGN_IDS:
        provider = REGISTRY.by_id(pid)
        assert provider is not None, pid
        assert provider.kind and provider.hosts and provider.parser


def test_every_parser_name_has_a_parser() -> None:
    """No registry entry names a parser that does not exist."""
    from parsers._analyse import PARSERS

    for provider in REGISTRY:
        assert provider.parser in PARSERS, provider.id


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com.", "openai"),
        ("myres.openai.azure.com", "azure_openai"),
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gemini"),
        ("us-central1-aiplatform.googleapis.com", "vertex_ai"),
        ("aiplatform.googleapis.com", "vertex_ai"),
        ("bedrock-runtime.us-east-1.amazonaws.com", "bedrock"),
        ("bedrock-runtime.ap-southeast-2.amazonaws.com", "bedrock"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "bedrock"),
        ("api.cohere.com", "cohere"),
        ("api.cohere.ai", "cohere"),
        ("api.together.ai", "together"),
        ("openrouter.ai", "openrouter"),
        ("router.huggingface.co", "huggingface"),
        ("polly.eu-west-1.amazonaws.com", "aws_polly"),
        ("transcribe.us-west-2.amazonaws.com", "aws_transcribe"),
        ("westeurope.tts.speech.microsoft.com", "azure_speech"),
        ("api.pinecone.io", "pinecone"),
        ("my-index-abc1234.svc.aped-4627-b74a.pinecone.io", "pinecone"),
        ("my-index-abc1234.svc.us-east1-gcp.pinecone.io", "pinecone"),
        ("abc.c0.us-west3.gcp.weaviate.cloud", "weaviate"),
        ("xyz-example.us-east4-0.gcp.cloud.qdrant.io", "qdrant"),
        ("in03-abc.serverless.gcp-us-west1.cloud.zilliz.com", "zilliz"),
        ("latency-dsn.algolia.net", "algolia"),
        ("abcdefgh.supabase.co", "supabase"),
        ("api.stripe.com", "stripe"),
        ("api-m.sandbox.paypal.com", "paypal"),
        # Never a substring of the URL, never a non-label suffix:
        ("api.openai.com.evil.test", None),
        ("evilapi.openai.com", None),
        ("xapi.openai.com", None),
        ("openai.com", None),
        ("notpinecone.io", None),
        ("pinecone.io", None),
        ("bedrock-runtime.amazonaws.com", None),
        ("bedrock-runtime.us-east-1.evil.amazonaws.com", None),
        ("bedrock-runtime.us-east-1.amazonaws.com.evil.test", None),
        ("-aiplatform.googleapis.com", None),
        ("us-central1-aiplatform.googleapis.com.evil.test", None),
        ("127.0.0.1", None),
        ("", None),
    ],
)
def test_host_matching(host: str, expected: str | None) -> None:
    """Exact names and label-boundary suffixes match; anything else does not."""
    provider = REGISTRY.for_host(host)
    assert (provider.id if provider else None) == expected


def test_query_string_never_selects_a_provider() -> None:
    """A provider host named in the query or path of another host is not that provider."""
    ex = exchange(
        "evil.test", "/api.openai.com/v1/chat/completions", b"{}", query="x=api.openai.com"
    )
    assert analyse(ex).provider == "unknown"


def test_provider_hint_wins_over_host() -> None:
    """Base-URL mode and --provider-host force the provider whatever the host is."""
    ex = exchange(
        "127.0.0.1",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        hint="openai",
    )
    assert analyse(ex).provider == "openai"


def test_unknown_hint_falls_back_to_host_and_says_so() -> None:
    """A hint that names no provider is ignored, with a flag."""
    ex = exchange(
        "api.openai.com",
        "/v1/embeddings",
        {"model": "x", "usage": {"prompt_tokens": 1, "total_tokens": 1}},
        hint="nope",
    )
    record = analyse(ex)
    assert record.provider == "openai"
    assert "unknown_provider_hint" in record.flags


def test_base_urls_for_base_url_mode() -> None:
    """Providers with a fixed public base URL expose it; per-account hosts have none."""
    for pid in (
        "openai",
        "anthropic",
        "gemini",
        "mistral",
        "groq",
        "cohere",
        "deepseek",
        "together",
        "fireworks",
        "openrouter",
        "xai",
        "perplexity",
    ):
        url = REGISTRY.base_url(pid)
        assert url is not None and url.startswith("https://"), pid
        host = url.split("/")[2]
        provider = REGISTRY.for_host(host)
        assert provider is not None and provider.id == pid
    for pid in ("azure_openai", "bedrock", "supabase", "weaviate"):
        assert REGISTRY.base_url(pid) is None


def test_every_exact_host_maps_to_its_provider() -> None:
    """The allowlist read from host_patterns() is consistent with for_host()."""
    for provider in REGISTRY:
        for pattern in provider.hosts:
            concrete = pattern.replace("*-", "region-").replace("*.", "x.").replace(".*.", ".r1.")
            found = REGISTRY.for_host(concrete)
            assert found is not None and found.id == provider.id, (pattern, concrete)
    assert set(REGISTRY.host_patterns()) >= {"api.openai.com", "*.pinecone.io"}


def test_canonical_host() -> None:
    """Lower case, one trailing dot and IPv6 brackets removed."""
    assert canonical_host(" API.OpenAI.COM. ") == "api.openai.com"
    assert canonical_host("[::1]") == "::1"
