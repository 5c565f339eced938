"""Attribution context: run, customer, tenant, properties and the section path.

One L{contextvars.ContextVar} holds an immutable L{ObserveContext}. Every
change builds a new value and sets it, so a thread or an asyncio task only
ever sees the values set in its own context (asyncio copies the context into
each new task; a new thread starts from an empty one). The context headers
for a call are computed once per value and cached on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar, overload

__all__ = [
    "ObserveContext",
    "Section",
    "context_headers",
    "current",
    "customer",
    "export_context",
    "import_context",
    "new_span_id",
    "properties",
    "section",
    "set_customer_id",
    "set_property",
    "set_run_id",
    "set_tenant_id",
]

P = ParamSpec("P")
R = TypeVar("R")

#: Keys of an exported context (see L{export_context}).
_EXPORT_KEYS = ("run_id", "customer_id", "tenant_id", "sections", "properties")


def new_span_id() -> str:
    """A fresh 16-hex-digit span id (64 random bits)."""
    return os.urandom(8).hex()


def _clean(value: str) -> str:
    """Make a label safe for an HTTP header value: printable ASCII only.

    Non-ASCII and control characters are percent-encoded (UTF-8), so a
    label can never inject a header line and always survives the trip.
    """
    if value.isascii() and value.isprintable():
        return value
    out = []
    for ch in value:
        if ch.isascii() and ch.isprintable() and ch != "%":
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ObserveContext:
    """The attribution labels in force for the current thread or task.

    C{sections} is the path from the outermost section inward, as
    C{(label, span_id)} pairs. C{None} for run, customer or tenant means "use
    the default given to L{llmobserve.observe}".
    """

    run_id: str | None = None
    customer_id: str | None = None
    tenant_id: str | None = None
    sections: tuple[tuple[str, str], ...] = ()
    properties: tuple[tuple[str, str], ...] = ()
    _headers: tuple[Defaults, list[tuple[str, str]]] | None = field(
        default=None, compare=False, repr=False, hash=False
    )

    @property
    def section_path(self) -> str | None:
        """Labels joined by C{/}, outermost first; C{None} outside any section."""
        return "/".join(label for label, _ in self.sections) if self.sections else None

    @property
    def span_id(self) -> str | None:
        """The span id of the innermost open section."""
        return self.sections[-1][1] if self.sections else None


@dataclass(frozen=True, slots=True)
class Defaults:
    """Process-wide defaults set by L{llmobserve.observe}."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    customer_id: str | None = None
    tenant_id: str | None = None


_EMPTY = ObserveContext()
_var: contextvars.ContextVar[ObserveContext] = contextvars.ContextVar(
    "llmobserve_context", default=_EMPTY
)
_defaults = Defaults()


def set_defaults(customer_id: str | None, tenant_id: str | None) -> None:
    """Set the process-wide customer and tenant used when none is in context."""
    global _defaults
    _defaults = replace(_defaults, customer_id=customer_id, tenant_id=tenant_id)


def defaults() -> Defaults:
    """The process-wide defaults."""
    return _defaults


def current() -> ObserveContext:
    """The context in force here."""
    return _var.get()


def _headers_of(ctx: ObserveContext, dflt: Defaults) -> list[tuple[str, str]]:
    out = [("X-LLMObserve-Run-ID", _clean(ctx.run_id or dflt.run_id))]
    if ctx.sections:
        label, span = ctx.sections[-1]
        out.append(("X-LLMObserve-Parent-Span-ID", span))
        out.append(("X-LLMObserve-Section", _clean(label)))
        out.append(("X-LLMObserve-Section-Path", _clean(ctx.section_path or "")))
    cust = ctx.customer_id or dflt.customer_id
    if cust:
        out.append(("X-LLMObserve-Customer-ID", _clean(cust)))
    tenant = ctx.tenant_id or dflt.tenant_id
    if tenant:
        out.append(("X-LLMObserve-Tenant-ID", _clean(tenant)))
    for name, value in ctx.properties:
        out.append((f"X-LLMObserve-Property-{name}", _clean(value)))
    return out


def context_headers() -> list[tuple[str, str]]:
    """The context headers for one outgoing call, a fresh span id included.

    The constant part is cached on the context value together with the
    defaults it was computed from, so a call costs one list copy and one id.
    """
    ctx = _var.get()
    dflt = _defaults
    cached = ctx._headers
    if cached is None or cached[0] is not dflt:
        cached = (dflt, _headers_of(ctx, dflt))
        object.__setattr__(ctx, "_headers", cached)
    return [*cached[1], ("X-LLMObserve-Span-ID", new_span_id())]


def _set(ctx: ObserveContext) -> contextvars.Token[ObserveContext]:
    return _var.set(ctx)


def set_run_id(run_id: str | None) -> None:
    """Label every later call in this thread/task (and tasks it starts) with C{run_id}."""
    _set(replace(_var.get(), run_id=run_id, _headers=None))


def set_customer_id(customer_id: str | None) -> None:
    """Attribute later calls in this thread/task to C{customer_id}."""
    _set(replace(_var.get(), customer_id=customer_id, _headers=None))


def set_tenant_id(tenant_id: str | None) -> None:
    """Attribute later calls in this thread/task to C{tenant_id}."""
    _set(replace(_var.get(), tenant_id=tenant_id, _headers=None))


def _valid_property_name(name: str) -> str:
    if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        raise ValueError(f"property name must be ASCII letters, digits, - or _: {name!r}")
    return name


def set_property(name: str, value: str | None) -> None:
    """Set (or with C{None}, remove) a free-form label sent as C{X-LLMObserve-Property-<name>}."""
    _valid_property_name(name)
    ctx = _var.get()
    props = tuple((k, v) for k, v in ctx.properties if k != name)
    if value is not None:
        props = (*props, (name, str(value)))
    _set(replace(ctx, properties=props, _headers=None))


@contextlib.contextmanager
def properties(**labels: str) -> Iterator[None]:
    """Add free-form labels for the calls made inside the block."""
    ctx = _var.get()
    for name in labels:
        _valid_property_name(name)
    props = tuple((k, v) for k, v in ctx.properties if k not in labels)
    props += tuple((k, str(v)) for k, v in labels.items())
    token = _set(replace(ctx, properties=props, _headers=None))
    try:
        yield
    finally:
        _var.reset(token)


@contextlib.contextmanager
def customer(customer_id: str | None, tenant_id: str | None = None) -> Iterator[None]:
    """Attribute the calls made inside the block to a customer (and tenant)."""
    ctx = _var.get()
    new = replace(
        ctx,
        customer_id=customer_id,
        tenant_id=tenant_id if tenant_id is not None else ctx.tenant_id,
        _headers=None,
    )
    token = _set(new)
    try:
        yield
    finally:
        _var.reset(token)


#: Receives every finished section (see L{llmobserve.sdk._spans}).
SpanSink = Callable[[dict[str, Any]], None]
_span_sink: SpanSink | None = None


def set_span_sink(sink: SpanSink | None) -> None:
    """Where finished sections go (C{None}: nowhere)."""
    global _span_sink
    _span_sink = sink


class _OpenSection:
    """One entry into a section: the token to restore and the span being timed."""

    __slots__ = ("ctx", "label", "parent", "span_id", "start", "t0", "token")

    def __init__(self, label: str) -> None:
        outer = _var.get()
        self.label = label
        self.span_id = new_span_id()
        self.parent = outer.span_id
        self.ctx = replace(outer, sections=(*outer.sections, (label, self.span_id)), _headers=None)
        self.token = _var.set(self.ctx)
        self.start = time.time()
        self.t0 = time.perf_counter()

    def close(self, failed: bool) -> None:
        duration = time.perf_counter() - self.t0
        _var.reset(self.token)
        sink = _span_sink
        if sink is None:
            return
        dflt = _defaults
        ctx = self.ctx
        sink(
            {
                "span_id": self.span_id,
                "parent_span_id": self.parent,
                "run_id": ctx.run_id or dflt.run_id,
                "name": self.label,
                "section_path": ctx.section_path,
                "start": self.start,
                "end": self.start + duration,
                "duration_ms": round(duration * 1000.0, 3),
                "status": "error" if failed else "ok",
                "customer_id": ctx.customer_id or dflt.customer_id,
                "tenant_id": ctx.tenant_id or dflt.tenant_id,
            }
        )


class Section:
    """A labelled part of the application; see L{section}.

    Used as a context manager (C{with} or C{async with}) or as a decorator
    of a plain or C{async} function. Each entry is its own span; entering
    the same object again while it is open nests a new span.
    """

    __slots__ = ("_open", "label")

    def __init__(self, label: str) -> None:
        if not label:
            raise ValueError("a section needs a non-empty label")
        self.label = label
        self._open: list[_OpenSection] = []

    @property
    def span_id(self) -> str | None:
        """The span id of the innermost open entry of this object, if any."""
        return self._open[-1].span_id if self._open else None

    def __enter__(self) -> Section:
        self._open.append(_OpenSection(self.label))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._open.pop().close(exc_type is not None)

    async def __aenter__(self) -> Section:
        return self.__enter__()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        label = self.label
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                entry = _OpenSection(label)
                failed = True
                try:
                    result = await fn(*args, **kwargs)
                    failed = False
                    return result
                finally:
                    entry.close(failed)

            return run_async

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            entry = _OpenSection(label)
            failed = True
            try:
                result = fn(*args, **kwargs)
                failed = False
                return result
            finally:
                entry.close(failed)

        return run


def section(label: str) -> Section:
    """Open a section: C{with section("agent:researcher"): ...} or C{@section("step")}.

    Sections nest into a path (C{"agent:researcher/tool:search"}); every call
    made inside carries the path and the section's span id, and the section
    itself is recorded as a span (start, end, duration, status).
    """
    return Section(label)


def export_context() -> dict[str, Any]:
    """The current context as a JSON-able dict, to carry to a worker (queue, process)."""
    ctx = _var.get()
    dflt = _defaults
    return {
        "run_id": ctx.run_id or dflt.run_id,
        "customer_id": ctx.customer_id or dflt.customer_id,
        "tenant_id": ctx.tenant_id or dflt.tenant_id,
        "sections": [list(s) for s in ctx.sections],
        "properties": dict(ctx.properties),
    }


@contextlib.contextmanager
def import_context(data: Mapping[str, Any]) -> Iterator[ObserveContext]:
    """Run a block under a context made by L{export_context} elsewhere.

    Calls made in the block carry the exported run, customer, tenant,
    properties and section path; sections opened in it nest under the
    exported one (its span becomes their parent).
    """
    unknown = set(data) - set(_EXPORT_KEYS)
    if unknown:
        raise ValueError(f"not an exported llmobserve context: unknown keys {sorted(unknown)}")
    sections = tuple((str(label), str(span)) for label, span in data.get("sections") or ())
    props = tuple(
        (_valid_property_name(str(k)), str(v)) for k, v in (data.get("properties") or {}).items()
    )
    ctx = ObserveContext(
        run_id=data.get("run_id"),
        customer_id=data.get("customer_id"),
        tenant_id=data.get("tenant_id"),
        sections=sections,
        properties=props,
    )
    token = _var.set(ctx)
    try:
        yield ctx
    finally:
        _var.reset(token)
