"""L{analyse}: one finished exchange in, one priced L{UsageRecord} out; never raises."""

from __future__ import annotations

from collections.abc import Callable, Container

from ._call import Call
from ._draft import USAGE_KEYS, UsageDraft
from ._modifiers import apply_modifiers
from ._records import Exchange, UsageRecord, construct
from .anthropic import parse_anthropic
from .bedrock import parse_bedrock
from .cohere import parse_cohere
from .gemini import parse_gemini
from .graphql import graphql_request, parse_graphql
from .media import MEDIA_PARSERS
from .openai import parse_openai
from .pinecone import parse_pinecone
from .pricing import PRICER, PriceResult
from .registry import REGISTRY, Provider
from .services import SERVICE_PARSERS
from .speech import SPEECH_PARSERS
from .vectors import VECTOR_PARSERS

__all__ = ["PARSERS", "analyse"]

Parser = Callable[[Call, UsageDraft], None]

#: Provider parser names (C{Provider.parser}) and the functions behind them.
PARSERS: dict[str, Parser] = {
    "openai": parse_openai,
    "anthropic": parse_anthropic,
    "gemini": parse_gemini,
    "bedrock": parse_bedrock,
    "cohere": parse_cohere,
    "pinecone": parse_pinecone,
    **SPEECH_PARSERS,
    **MEDIA_PARSERS,
    **VECTOR_PARSERS,
    **SERVICE_PARSERS,
}

_KEY_ORDER = {key: i for i, key in enumerate(USAGE_KEYS)}
_IN_ORDER: dict[tuple[str, ...], bool] = {}  # usage key sequences seen: already in order?


def _in_key_order(keys: tuple[str, ...]) -> bool:
    known = _IN_ORDER.get(keys)
    if known is None:
        ranks = [_KEY_ORDER.get(k, 99) for k in keys]
        known = ranks == sorted(ranks)
        if len(_IN_ORDER) >= 1024:  # keys come from parsers, but stay bounded
            _IN_ORDER.clear()
        _IN_ORDER[keys] = known
    return known


def _provider(exchange: Exchange) -> tuple[Provider | None, list[str]]:
    flags: list[str] = []
    if exchange.provider_hint:
        hinted = REGISTRY.by_id(exchange.provider_hint)
        if hinted is not None:
            return hinted, flags
        flags.append("unknown_provider_hint")
    return REGISTRY.for_host(exchange.host), flags


def analyse(exchange: Exchange, *, no_estimate: Container[str] = ()) -> UsageRecord:
    """Usage and cost of one exchange. Total: whatever the input, returns a record.

    @param no_estimate: provider ids whose streams without usage stay
        unpriced (C{--stream-usage PROVIDER=off}); the others get an
        estimate, marked C{usage_source: estimated}.
    """
    try:
        return _analyse(exchange, no_estimate)
    except Exception as exc:  # the last line of defence: observation never breaks traffic
        provider = exchange.provider_hint if isinstance(exchange.provider_hint, str) else "unknown"
        return UsageRecord(
            provider=provider or "unknown",
            endpoint=None,
            model=None,
            streamed=False,
            usage={},
            usage_source="missing",
            cost_usd=None,
            price_ref="not priced: parser failure",
            parse_error=f"internal error: {type(exc).__name__}: {str(exc)[:120]}",
            flags=("parser_exception",),
        )


def _analyse(exchange: Exchange, no_estimate: Container[str]) -> UsageRecord:
    provider, flags = _provider(exchange)
    call = Call(
        exchange,
        provider,
        estimate_usage=not no_estimate or provider is None or provider.id not in no_estimate,
    )
    draft = UsageDraft(flags=flags)
    if call.body_error:
        draft.error(call.body_error)
    if call.body_truncated:
        draft.flag("parse_truncated")
    if exchange.request_body_truncated:
        draft.flag("request_truncated")
    parser = PARSERS.get(provider.parser) if provider is not None else None
    gql = None
    if parser is None or provider is None or provider.kind in ("vector_db", "backend", "database"):
        gql = graphql_request(call)
    if gql is not None:
        if (
            parser is not None
            and provider is not None
            and provider.parser not in ("weaviate", "supabase")
        ):
            parser(call, draft)
        parse_graphql(call, draft, gql)
        if provider is None or provider.parser in ("weaviate", "supabase"):
            draft.endpoint = (draft.graphql or {}).get("operation_type") or "graphql"
            if draft.unpriced_reason is None:
                draft.unpriced_reason = "GraphQL calls have no per-request price"
        provider_id = provider.id if provider is not None else "graphql"
    elif parser is not None and provider is not None:
        parser(call, draft)
        provider_id = provider.id
    else:
        provider_id = provider.id if provider is not None else "unknown"
        draft.unpriced_reason = "no parser for this host"
    if call.stream_dropped:
        draft.flag("sse_oversized_dropped")
    if exchange.status is not None and exchange.status >= 400:
        draft.flag("upstream_error_status")
    return _finish(exchange, provider, provider_id, draft)


def _finish(
    exchange: Exchange, provider: Provider | None, provider_id: str, draft: UsageDraft
) -> UsageRecord:
    usage = draft.usage
    if len(usage) > 1 and not _in_key_order(tuple(usage)):
        usage = dict(sorted(usage.items(), key=lambda kv: _KEY_ORDER.get(kv[0], 99)))
    if draft.reported_cost_usd is not None:
        priced = PriceResult(draft.reported_cost_usd, f"reported:{provider_id}")
    elif draft.unpriced_reason is not None:
        priced = PriceResult(None, f"not priced: {draft.unpriced_reason}")
    elif not usage:
        reason = "no usage reported"
        if exchange.status is not None and exchange.status >= 400:
            reason += f" (HTTP {exchange.status})"
        priced = PriceResult(None, reason)
    else:
        priced = PRICER.price(
            provider_id,
            provider.prices_id if provider is not None else None,
            draft.model,
            usage,
            exchange.started_at,
            item=draft.price_item,
            context=draft.price_context or None,
            use_genai=provider is None or provider.prices_id is not None or provider.kind == "llm",
            tool_calls=draft.tool_calls or None,
        )
    if draft.batch or draft.tool_calls or priced.modifiers:
        priced = apply_modifiers(draft, priced)
    why_estimated = draft.details.get("estimate_reason")
    if isinstance(why_estimated, str) and draft.usage_source == "estimated":
        priced = PriceResult(
            priced.cost_usd, f"estimated ({why_estimated}): {priced.price_ref}", priced.breakdown
        )
    request_model = draft.request_model
    return construct(
        UsageRecord,
        provider=provider_id,
        endpoint=draft.endpoint,
        model=draft.model,
        streamed=draft.streamed,
        usage=usage,
        usage_source=draft.usage_source,
        cost_usd=priced.cost_usd,
        price_ref=priced.price_ref,
        graphql=draft.graphql,
        parse_error=draft.parse_error,
        flags=tuple(draft.flags),
        request_model=request_model,
        response_id=draft.response_id,
        cost_breakdown=priced.breakdown,
        estimated_keys=tuple(draft.estimated_keys),
        details=draft.details,
    )
