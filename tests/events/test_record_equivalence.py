"""The event builder's fast paths give exactly the map the plain code gave.

C{build_call_event} skips calls for the common case (short printable
strings, plain ints and floats, an empty context). The reference below is
the straightforward version it replaced; for any transaction and usage
record, both must build the same map, byte for byte once packed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
from events.eventkit import FakeUsage, make_txn
from hypothesis import given, settings
from hypothesis import strategies as st

from llmobserve.events._record import _MAX_ITEMS, _MAX_STR, build_call_event, sanitise, sanitise_str
from llmobserve.transaction import Context, Outcome, Transaction


def _opt_str(value: object, limit: int = 256) -> str | None:
    if value is None:
        return None
    return sanitise_str(value if isinstance(value, str) else str(value), limit)


def _usage_map(usage: Any) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for i, (k, v) in enumerate(usage.items()):
        if i >= _MAX_ITEMS:
            break
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        clean = sanitise(v)
        if clean is not None:
            out[sanitise_str(str(k), 64)] = clean
    return out


def _ms(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return round(seconds * 1000.0, 3)


def reference_build_call_event(
    txn: Transaction,
    usage: Any,
    *,
    event_id: str,
    proxy_id: str,
    parse_error: str | None = None,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """build_call_event as it was before its fast paths."""
    all_flags = list(usage.flags) if usage is not None else []
    all_flags.extend(flags)
    if txn.error is not None:
        all_flags.append(f"error:{txn.error}")
    if usage is not None:
        provider: str | None = usage.provider
        endpoint, model, streamed = usage.endpoint, usage.model, usage.streamed
        usage_map = _usage_map(usage.usage)
        source: str = usage.usage_source
        cost = usage.cost_usd
        if cost is not None and not (isinstance(cost, int | float) and math.isfinite(cost)):
            cost = None
            all_flags.append("cost_not_finite")
        price_ref, graphql = usage.price_ref, usage.graphql
        if parse_error is None:
            parse_error = usage.parse_error
    else:
        provider = txn.provider_hint or "unknown"
        endpoint = model = price_ref = None
        streamed = False
        usage_map = {}
        source = "missing"
        cost = None
        graphql = None
    return {
        "id": event_id,
        "kind": "call",
        "ts": txn.started_at if math.isfinite(txn.started_at) else None,
        "duration_ms": _ms(txn.duration),
        "ttfb_ms": _ms(txn.ttfb),
        "overhead_ms": _ms(txn.overhead),
        "method": sanitise_str(txn.method, 32),
        "host": sanitise_str(txn.host, 256),
        "path": sanitise_str(txn.path.partition("?")[0], _MAX_STR),
        "status": txn.status,
        "outcome": txn.outcome.value,
        "provider": _opt_str(provider, 64),
        "endpoint": _opt_str(endpoint, 128),
        "model": _opt_str(model),
        "streamed": bool(streamed),
        "usage": usage_map,
        "usage_source": sanitise_str(source, 32),
        "cost_usd": cost,
        "price_ref": _opt_str(price_ref),
        "request_bytes": txn.request_bytes,
        "response_bytes": txn.response_bytes,
        "graphql": sanitise(graphql) if graphql is not None else None,
        "context": sanitise(txn.context.as_dict()),
        "parse_error": _opt_str(parse_error, 512),
        "flags": [sanitise_str(f, 128) for f in all_flags[:_MAX_ITEMS]],
        "proxy_id": proxy_id,
    }


_text = (
    st.text(max_size=40)
    | st.text(st.characters(exclude_categories=()), max_size=10)  # surrogates too
    | st.text(min_size=1000, max_size=1100)
    | st.just("gpt-4o")
)
_numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
)
_usages = st.builds(
    FakeUsage,
    provider=_text,
    endpoint=st.none() | _text,
    model=st.none() | _text,
    streamed=st.booleans(),
    usage=st.dictionaries(_text, _numbers, max_size=5)
    | st.dictionaries(st.text(max_size=2), st.integers(), min_size=70, max_size=70),
    usage_source=_text,
    cost_usd=st.none() | st.floats() | st.integers(min_value=0, max_value=10),
    price_ref=st.none() | _text,
    graphql=st.none() | st.dictionaries(_text, _numbers, max_size=3),
    parse_error=st.none() | _text,
    flags=st.lists(_text, max_size=3).map(tuple),
)
_contexts = st.builds(
    Context,
    run_id=st.none() | _text,
    span_id=st.none() | _text,
    section=st.none() | _text,
    section_path=st.none() | _text,
    customer_id=st.none() | _text,
    tenant_id=st.none() | _text,
    properties=st.dictionaries(_text, _text, max_size=3),
)
_times = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(
    usage=st.none() | _usages,
    context=_contexts,
    method=_text,
    host=_text,
    path=_text,
    error=st.none() | _text,
    duration=_times,
    ttfb=st.none() | _times,
    started_at=_times,
    flags=st.lists(_text, max_size=2),
)
def test_fast_paths_build_the_same_event(
    usage: FakeUsage | None,
    context: Context,
    method: str,
    host: str,
    path: str,
    error: str | None,
    duration: float,
    ttfb: float | None,
    started_at: float,
    flags: list[str],
) -> None:
    """Any transaction and usage record: the same map as the plain builder."""
    txn = make_txn(
        context=context,
        method=method,
        host=host,
        path=path,
        error=error,
        duration=duration,
        ttfb=ttfb,
        started_at=started_at,
        outcome=Outcome.CLIENT_ABORTED if error else Outcome.OK,
    )
    kw: dict[str, Any] = dict(event_id="e", proxy_id="p", flags=flags)
    got = build_call_event(txn, usage, **kw)
    want = reference_build_call_event(txn, usage, **kw)
    assert msgpack.packb(got, use_bin_type=True) == msgpack.packb(want, use_bin_type=True)
    assert repr(got) == repr(want)


@settings(max_examples=300, deadline=None)
@given(
    usage=st.none() | _usages,
    context=_contexts,
    path=_text,
    error=st.none() | _text,
    duration=_times,
    started_at=_times,
)
def test_a_row_made_ahead_is_the_row_of_the_stored_payload(
    usage: FakeUsage | None,
    context: Context,
    path: str,
    error: str | None,
    duration: float,
    started_at: float,
) -> None:
    """The parse threads make the embedded store's row from the event they
    built; the store would have made the same row from the packed payload
    (or the event is left to the careful path: no row made ahead)."""
    from llmobserve.collector._store import EventStore
    from llmobserve.events._embedded import _unpack
    from llmobserve.events._record import pack_event

    txn = make_txn(
        context=context,
        path=path,
        error=error,
        duration=duration,
        started_at=started_at,
        outcome=Outcome.CLIENT_ABORTED if error else Outcome.OK,
    )
    event = build_call_event(txn, usage, event_id="018bcfe56800f47f2545e3dff99aa320", proxy_id="p")
    ahead = EventStore.row_for(event)
    (decoded,) = _unpack([(1, pack_event(event))])
    if ahead is not None:
        assert repr(ahead) == repr(EventStore.rows_for([decoded])[0])
