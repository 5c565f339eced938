"""The event record: one msgpack-safe map per call, span or gap.

Built from a L{Transaction} and the parsers' C{UsageRecord} (or without one
when parsing was skipped or failed). Everything here is a pure function that
runs in a parse worker thread, except the rare fallbacks the pipeline builds
on the reactor (queue full, parse crashed, shutdown).

What reaches msgpack is sanitised: strings have no control characters (they
are escaped as C{\\uXXXX}) and no lone surrogates, floats are finite, ints
fit 64 bits, containers are bounded in size and depth. No header, body or
query string ever enters an event, so no secret can.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import attrs
import msgpack

from llmobserve.events.fields import EVENT_FIELDS
from llmobserve.transaction import Context, RawHeaders, Transaction

__all__ = [
    "CALL_FIELDS",
    "UsageLike",
    "build_call_event",
    "build_gap_event",
    "build_span_event",
    "headers_to_mapping",
    "new_event_id",
    "pack_event",
    "sanitise",
]

#: The keys of every call event, in order (DESIGN.md's table plus ours).
CALL_FIELDS: Final = (*EVENT_FIELDS, "parse_error", "flags", "proxy_id")

_MAX_STR: Final = 1024
_MAX_ITEMS: Final = 64
_MAX_DEPTH: Final = 4
_MAX_SPAN_KEYS: Final = 32
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


class UsageLike(Protocol):
    """The fields of C{parsers.UsageRecord} that an event reads."""

    @property
    def provider(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def streamed(self) -> bool: ...
    @property
    def usage(self) -> Mapping[str, int | float]: ...
    @property
    def usage_source(self) -> str: ...
    @property
    def cost_usd(self) -> float | None: ...
    @property
    def price_ref(self) -> str | None: ...
    @property
    def graphql(self) -> Mapping[str, Any] | None: ...
    @property
    def parse_error(self) -> str | None: ...
    @property
    def flags(self) -> tuple[str, ...]: ...


def new_event_id(now: float | None = None) -> str:
    """A 32-hex-digit id ordered by creation time (ms), then 80 random bits.

    Time order keeps the collector's id index append-mostly; the random part
    makes collisions between proxies practically impossible.
    """
    ms = int((time.time() if now is None else now) * 1000) & 0xFFFFFFFFFFFF
    # random, not os.urandom: no syscall (that would release the GIL on the
    # reactor); the module reseeds itself in forked children. One 128-bit
    # int to hex: the same 12 + 20 digits as formatting each part, faster.
    return (ms << 80 | random.getrandbits(80)).to_bytes(16).hex()


def _escape(s: str) -> str:
    out = []
    for ch in s:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def sanitise_str(s: str, limit: int = _MAX_STR) -> str:
    """Cap, escape control/format/separator characters and lone surrogates."""
    if len(s) > limit:
        s = s[:limit]
    if s.isprintable():
        return s
    return _escape(s)


def sanitise(value: Any, depth: int = 0) -> Any:
    """Return C{value} in a form msgpack packs without error or surprise.

    Non-finite floats become None, oversized ints are clamped, bytes and
    unknown objects become (escaped) strings, containers are capped at
    64 items and 4 levels.
    """
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return sanitise_str(value)
    if isinstance(value, int):
        return min(max(value, _INT_MIN), _INT_MAX)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= _MAX_ITEMS:
                break
            out[sanitise_str(str(k), 128)] = sanitise(v, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [sanitise(v, depth + 1) for v in value[:_MAX_ITEMS]]
    if isinstance(value, bytes | bytearray):
        return sanitise_str(bytes(value[:_MAX_STR]).decode("utf-8", "replace"))
    return sanitise_str(repr(value))


def _clean(s: str, limit: int) -> str:
    # sanitise_str, with the common case (short and printable) inline
    return s if len(s) <= limit and s.isprintable() else sanitise_str(s, limit)


def _opt_str(value: object, limit: int = 256) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _clean(value, limit)
    return sanitise_str(str(value), limit)


def _usage_map(usage: Mapping[str, Any]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for i, (k, v) in enumerate(usage.items()):
        if i >= _MAX_ITEMS:
            break
        kind = type(v)
        if kind is int and _INT_MIN <= v <= _INT_MAX:
            clean: Any = v  # what sanitise() returns for it
        elif kind is float:
            if not math.isfinite(v):
                continue
            clean = v
        elif isinstance(v, bool) or not isinstance(v, int | float):
            continue
        else:
            clean = sanitise(v)
            if clean is None:
                continue
        if type(k) is str and len(k) <= 64 and k.isprintable():
            out[k] = clean
        else:
            out[sanitise_str(str(k), 64)] = clean
    return out


def _ms(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return round(seconds * 1000.0, 3)


#: Context's label fields (everything but C{properties}), in C{as_dict} order.
_CONTEXT_LABELS: Final = tuple(f.name for f in attrs.fields(Context) if f.name != "properties")


def _context_map(context: Context) -> dict[str, Any]:
    """C{sanitise(context.as_dict())}, without building the intermediate maps."""
    out: dict[str, Any] = {}
    for name in _CONTEXT_LABELS:
        value = getattr(context, name)
        if value is not None:
            out[name] = sanitise(value, 1)
    if context.properties:
        out["properties"] = sanitise(dict(context.properties), 1)
    return out


def headers_to_mapping(pairs: RawHeaders) -> dict[str, str]:
    """Raw wire header pairs as a C{Mapping[str, str]} with lower-case names.

    Repeated fields are joined with C{", "} (RFC 9110 5.3). Runs in the
    worker thread, never on the reactor.
    """
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = out.get(key)
        out[key] = text if prev is None else f"{prev}, {text}"
    return out


def header_value(pairs: RawHeaders, name: str) -> str | None:
    """C{headers_to_mapping(pairs).get(name)} for one lower-case C{name},
    without decoding the other names: those of another length are skipped
    unread (latin-1 has as many characters as bytes)."""
    size = len(name)
    found: str | None = None
    for raw, value in pairs:
        if len(raw) == size and raw.decode("latin-1").lower() == name:
            text = value.decode("latin-1")
            found = text if found is None else f"{found}, {text}"
    return found


#: Outcomes of a call the proxy answered itself (see docs/EVENTS.md).
_NOT_FORWARDED: Final = frozenset({"refused", "proxy_error", "budget_refused"})


#: The port a scheme implies: an event names its port only when it differs.
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def build_call_event(
    txn: Transaction,
    usage: UsageLike | None,
    *,
    event_id: str,
    proxy_id: str,
    parse_error: str | None = None,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """The event map for one exchange.

    @param usage: the parsers' record, or None when parsing was skipped or
        failed (then C{usage_source} is C{missing} and the provider is the
        hint or C{unknown}).
    @param parse_error: an error from calling the parser itself; the
        record's own C{parse_error} is used when this is None.
    @param flags: extra flags (C{parse_skipped}, ...) added to the record's.
    """
    all_flags = list(usage.flags) if usage is not None else []
    if txn.outcome in _NOT_FORWARDED and not txn.response_headers:
        # The status is the proxy's own: nothing came back from upstream.
        all_flags = [f for f in all_flags if f != "upstream_error_status"]
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
    event: dict[str, Any] = {
        "id": event_id,
        "kind": "call",
        "ts": txn.started_at if math.isfinite(txn.started_at) else None,
        "duration_ms": _ms(txn.duration),
        "ttfb_ms": _ms(txn.ttfb),
        "overhead_ms": _ms(txn.overhead),
        "method": _clean(txn.method, 32),
        "host": _clean(txn.host, 256),
        # the path never carries the query; strip one defensively if it does
        "path": _clean(txn.path.partition("?")[0], _MAX_STR),
        "status": txn.status,
        "outcome": txn.outcome.value,
        "provider": _opt_str(provider, 64),
        "endpoint": _opt_str(endpoint, 128),
        "model": _opt_str(model),
        "streamed": bool(streamed),
        "usage": usage_map,
        "usage_source": _clean(source, 32),
        "cost_usd": cost,
        "price_ref": _opt_str(price_ref),
        "request_bytes": txn.request_bytes,
        "response_bytes": txn.response_bytes,
        "graphql": sanitise(graphql) if graphql is not None else None,
        "context": _context_map(txn.context),
        "parse_error": _opt_str(parse_error, 512),
        "flags": [_clean(f, 128) for f in all_flags[:_MAX_ITEMS]],
        "proxy_id": proxy_id,
    }
    if txn.project is not None:
        event["project"] = txn.project
    if txn.port != _DEFAULT_PORTS.get(txn.scheme):
        # DESIGN.md's host is the name alone (what reports group and filter
        # on); a port other than the scheme's own travels beside it
        event["port"] = txn.port
    return event


_SPAN_CONTEXT: Final = (
    "run_id",
    "span_id",
    "parent_span_id",
    "section_path",
    "customer_id",
    "tenant_id",
)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def build_span_event(span: Mapping[str, Any], *, event_id: str, proxy_id: str) -> dict[str, Any]:
    """The event map for one SDK span (C{POST /spans}); untrusted input."""
    context = {k: _opt_str(span.get(k)) for k in _SPAN_CONTEXT if span.get(k) is not None}
    section_path = context.get("section_path")
    if section_path:
        context["section"] = section_path.rsplit("/", 1)[-1]
    extra = {
        k: v
        for k, v in list(span.items())[:_MAX_SPAN_KEYS]
        if k not in _SPAN_CONTEXT and k not in ("name", "start", "end", "duration_ms", "status")
    }
    start, end = _num(span.get("start")), _num(span.get("end"))
    duration_ms = _num(span.get("duration_ms"))
    if duration_ms is None and start is not None and end is not None:
        duration_ms = round((end - start) * 1000.0, 3)
    return {
        "id": event_id,
        "kind": "span",
        "ts": start,
        "duration_ms": duration_ms,
        "name": _opt_str(span.get("name")),
        "span_status": _opt_str(span.get("status"), 64),
        "context": context,
        "attributes": sanitise(extra) if extra else {},
        "parse_error": None,
        "flags": [],
        "proxy_id": proxy_id,
    }


def build_gap_event(dropped: int, *, event_id: str, proxy_id: str, ts: float) -> dict[str, Any]:
    """A gap record: C{dropped} events were lost because the spool was full."""
    return {
        "id": event_id,
        "kind": "gap",
        "ts": ts,
        "dropped": dropped,
        "parse_error": None,
        "flags": ["spool_full"],
        "proxy_id": proxy_id,
    }


_packer_kwargs: Final = {"use_bin_type": True}
_packers = threading.local()  # a Packer per thread: packb builds one per call


def pack_event(event: Mapping[str, Any]) -> bytes:
    """Pack an already-sanitised event map (msgpack, bin type on).

    Same bytes as C{msgpack.packb(event, use_bin_type=True)}; a Packer
    whose C{pack} raised starts empty again (msgpack resets it).
    """
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(**_packer_kwargs)
    packed: bytes = packer.pack(event)
    return packed
