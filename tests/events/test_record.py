"""The event record: field names, no secrets, msgpack-safe values."""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from events.eventkit import CANARIES, FakeUsage, fake_analyse, make_txn
from hypothesis import given
from hypothesis import strategies as st

from llmobserve.events._exchange import HeaderMap, exchange_from_transaction
from llmobserve.events._record import (
    CALL_FIELDS,
    build_call_event,
    build_gap_event,
    build_span_event,
    header_value,
    headers_to_mapping,
    new_event_id,
    pack_event,
    sanitise,
)
from llmobserve.transaction import Context, Outcome

DESIGN_FIELDS = {
    "id", "ts", "duration_ms", "ttfb_ms", "overhead_ms", "method", "host", "path",
    "status", "outcome", "provider", "endpoint", "model", "streamed", "usage",
    "usage_source", "cost_usd", "price_ref", "request_bytes", "response_bytes",
    "graphql", "context",
}  # fmt: skip


def roundtrip(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(pack_event(event), raw=False)
    return out


def test_call_event_fields_exactly_design_plus_ours() -> None:
    """A call event carries DESIGN.md's fields plus kind, parse_error, flags, proxy_id."""
    usage = fake_analyse(exchange_from_transaction(make_txn()))
    event = roundtrip(build_call_event(make_txn(), usage, event_id="e1", proxy_id="p1"))
    assert set(event) == DESIGN_FIELDS | {"kind", "parse_error", "flags", "proxy_id"}
    assert tuple(event) == CALL_FIELDS
    assert event["kind"] == "call"
    assert event["ts"] == 1_700_000_000.25
    assert event["duration_ms"] == 200.0 and event["ttfb_ms"] == 100.0
    assert event["overhead_ms"] == 0.1
    assert event["usage"] == {"input_tokens": 3, "output_tokens": 5}
    assert event["usage_source"] == "reported" and event["cost_usd"] == 0.000125
    assert event["context"] == {
        "run_id": "run-1",
        "section": "s",
        "customer_id": "cust-9",
        "properties": {"team": "a"},
    }
    assert event["outcome"] == "ok" and event["status"] == 200


def test_unparsed_event_says_missing_and_keeps_sizes() -> None:
    """Without a usage record: usage_source missing, provider from the hint, flags kept."""
    txn = make_txn(provider_hint="anthropic", outcome=Outcome.CLIENT_ABORTED, error="client_gone")
    event = roundtrip(
        build_call_event(txn, None, event_id="e", proxy_id="p", flags=("parse_skipped",))
    )
    assert event["usage_source"] == "missing" and event["usage"] == {}
    assert event["provider"] == "anthropic" and event["cost_usd"] is None
    assert event["flags"] == ["parse_skipped", "error:client_gone"]
    assert event["request_bytes"] == 33 and event["response_bytes"] == 52
    assert set(event) == set(CALL_FIELDS)


def test_no_secret_reaches_the_packed_event() -> None:
    """Authorization, api-key headers, cookies and key= query values never appear."""
    txn = make_txn(path="/v1/x?key=CANARY-query")
    usage = fake_analyse(exchange_from_transaction(txn))
    for u in (usage, None):
        blob = pack_event(build_call_event(txn, u, event_id="e", proxy_id="p"))
        for canary in CANARIES:
            assert canary.encode() not in blob
        assert b"key=" not in blob


def test_non_finite_numbers_are_sanitised() -> None:
    """NaN/inf in usage, cost and timings never reach msgpack."""
    usage = FakeUsage(usage={"input_tokens": math.nan, "output_tokens": 7, "x": math.inf})
    usage = FakeUsage(**{**usage.__dict__, "cost_usd": math.inf})
    txn = make_txn(duration=math.nan, ttfb=math.inf)
    event = roundtrip(build_call_event(txn, usage, event_id="e", proxy_id="p"))
    assert event["usage"] == {"output_tokens": 7}
    assert event["cost_usd"] is None and "cost_not_finite" in event["flags"]
    assert event["duration_ms"] is None and event["ttfb_ms"] is None


def test_strings_lose_control_characters_and_lone_surrogates() -> None:
    """Control characters are escaped, lone surrogates never break packing."""
    ctx = Context(section="a\r\nInjected: 1", properties={"k\x1b[31m": "v\u2028\udc80"})
    txn = make_txn(context=ctx, path="/v1/\x00x")
    event = roundtrip(build_call_event(txn, None, event_id="e", proxy_id="p"))
    assert event["context"]["section"] == "a\\u000d\\u000aInjected: 1"
    assert event["context"]["properties"] == {"k\\u001b[31m": "v\\u2028\\udc80"}
    assert event["path"] == "/v1/\\u0000x"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=30,
    )
)
def test_sanitise_makes_anything_packable(value: Any) -> None:
    """Whatever a parser or an SDK hands over, packing never raises."""
    msgpack.packb(sanitise(value), use_bin_type=True)


def test_span_and_gap_events() -> None:
    """Spans become kind=span with a context; gaps carry the dropped count."""
    span = {
        "span_id": "s1", "parent_span_id": "s0", "run_id": "r", "name": "step\n",
        "section_path": "agent/step", "start": 10.0, "end": 10.5, "status": "ok",
        "customer_id": "c", "weird": float("nan"),
    }  # fmt: skip
    event = roundtrip(build_span_event(span, event_id="e", proxy_id="p"))
    assert event["kind"] == "span" and event["ts"] == 10.0 and event["duration_ms"] == 500.0
    assert event["context"]["span_id"] == "s1" and event["context"]["section"] == "step"
    assert event["name"] == "step\\u000a" and event["attributes"] == {"weird": None}
    gap = roundtrip(build_gap_event(42, event_id="g", proxy_id="p", ts=1.0))
    assert gap["kind"] == "gap" and gap["dropped"] == 42


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_event_id(1000.0 + i) for i in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)
    assert all(len(i) == 32 for i in ids)


def test_headers_to_mapping_lowercases_and_joins() -> None:
    got = headers_to_mapping(((b"X-A", b"1"), (b"x-a", b"2"), (b"B", b"\xff")))
    assert got == {"x-a": "1, 2", "b": "\xff"}


# Names from a few letters, cases and latin-1 bytes, so that repeats, case
# variants and names of one length but another spelling all come up.
_NAMES = st.lists(st.sampled_from([b"a", b"A", b"b", b"\xe0", b"\xc0", b"-"]), max_size=3).map(
    b"".join
)


@given(st.lists(st.tuples(_NAMES, st.binary(max_size=4)), max_size=6))
def test_header_value_is_the_mapping_s_value_for_one_name(pairs: list[tuple[bytes, bytes]]) -> None:
    """header_value() gives what headers_to_mapping()'s dict would, name by name."""
    decoded = headers_to_mapping(tuple(pairs))
    for name in [*decoded, "a", "ab", "\xe0", "\xc0-", "x"]:
        assert header_value(tuple(pairs), name) == decoded.get(name), name


def test_header_map_reads_as_the_decoded_mapping() -> None:
    """The lazily decoded headers answer exactly as headers_to_mapping's dict:
    get() first scans the raw pairs for its one name, then reads the map
    once something has decoded it."""
    pairs = ((b"X-A", b"1"), (b"x-a", b"2"), (b"Content-Type", b"application/json"))
    scanning = HeaderMap(pairs)
    assert scanning.get("x-a") == "1, 2" and scanning.get("content-type") == "application/json"
    assert scanning.get("X-A") is None and scanning.get("x-b", "d") == "d"
    assert scanning._map is None  # nothing decoded yet
    lazy, plain = HeaderMap(pairs), headers_to_mapping(pairs)
    assert lazy.get("x-a") == "1, 2" and lazy["content-type"] == "application/json"
    assert lazy.get("missing") is None and lazy.get("missing", "d") == "d"
    assert "x-a" in lazy and "X-A" not in lazy
    assert list(lazy) == list(plain) and len(lazy) == len(plain) and dict(lazy) == plain
    assert lazy == plain and lazy == HeaderMap(pairs) and lazy != {}
    exchange = exchange_from_transaction(make_txn())
    assert exchange.request_headers.get("authorization") == "Bearer sk-CANARY-auth"
    assert exchange.response_headers == headers_to_mapping(make_txn().response_headers)


def test_pack_event_is_packb_even_after_a_failed_pack() -> None:
    """The per-thread packer gives packb's bytes, also after a value it refused."""
    event = build_call_event(make_txn(), None, event_id="e", proxy_id="p")
    with pytest.raises(TypeError):
        pack_event({"bad": object()})
    assert pack_event(event) == msgpack.packb(event, use_bin_type=True)


def test_event_id_is_time_then_random_hex() -> None:
    """12 hex digits of milliseconds, then 20 of randomness (80 bits)."""
    random.seed(7)
    got = new_event_id(1_700_000_000.123)
    random.seed(7)
    assert got == f"{1_700_000_000_123:012x}{random.getrandbits(80):020x}"


@pytest.mark.parametrize(
    ("outcome", "status", "error"),
    [(Outcome.REFUSED, 403, "not_allowed"), (Outcome.PROXY_ERROR, 502, "unresolvable")],
)
def test_the_proxys_own_answer_is_not_an_upstream_error_status(
    outcome: Outcome, status: int, error: str
) -> None:
    """A call the proxy answered itself (nothing went upstream) keeps its outcome and
    is not flagged C{upstream_error_status} (issue 14, item 12)."""
    from llmobserve.events._exchange import default_analyse

    txn = make_txn(
        host="10.0.0.1",
        status=status,
        response_headers=(),
        response_body=b"",
        response_bytes=0,
        ttfb=None,
        outcome=outcome,
        error=error,
    )
    event = build_call_event(
        txn, default_analyse()(exchange_from_transaction(txn)), event_id="e", proxy_id="p"
    )
    assert event["outcome"] == outcome.value and event["status"] == status
    assert "upstream_error_status" not in event["flags"]
    assert f"error:{error}" in event["flags"]


def test_an_upstream_error_status_is_still_flagged() -> None:
    from llmobserve.events._exchange import default_analyse

    txn = make_txn(status=429, outcome=Outcome.UPSTREAM_ERROR)
    event = build_call_event(
        txn, default_analyse()(exchange_from_transaction(txn)), event_id="e", proxy_id="p"
    )
    assert "upstream_error_status" in event["flags"]


@pytest.mark.parametrize(
    ("scheme", "port", "expected"),
    [("https", 443, None), ("http", 80, None), ("http", 8443, 8443), ("https", 80, 80)],
)
def test_the_port_is_named_only_when_not_the_schemes_own(
    scheme: str, port: int, expected: int | None
) -> None:
    """host stays the name alone (DESIGN.md); a port other than the
    scheme's default travels as the event's port, else there is none."""
    txn = make_txn(scheme=scheme, host="127.0.0.1", port=port)
    event = roundtrip(build_call_event(txn, None, event_id="e1", proxy_id="p1"))
    assert event["host"] == "127.0.0.1"
    assert event.get("port") == expected
    assert ("port" in event) is (expected is not None)
