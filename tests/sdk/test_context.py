"""Context: sections, customers, run ids, properties, isolation, export/import, spans."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import llmobserve
from llmobserve.sdk import _context
from llmobserve.sdk._context import context_headers, current


def _h() -> dict[str, str]:
    return dict(context_headers())


@pytest.fixture
def spans() -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    _context.set_span_sink(got.append)
    return got


def test_sections_nest_into_a_path() -> None:
    """Nested sections build C{outer/inner}; the call's parent span is the innermost section."""
    assert "X-LLMObserve-Section-Path" not in _h()
    with llmobserve.section("agent:researcher") as outer:
        assert _h()["X-LLMObserve-Section-Path"] == "agent:researcher"
        with llmobserve.section("tool:search") as inner:
            h = _h()
            assert h["X-LLMObserve-Section-Path"] == "agent:researcher/tool:search"
            assert h["X-LLMObserve-Section"] == "tool:search"
            assert h["X-LLMObserve-Parent-Span-ID"] == inner.span_id
            assert inner.span_id != outer.span_id
        assert _h()["X-LLMObserve-Section-Path"] == "agent:researcher"
    assert "X-LLMObserve-Section-Path" not in _h()


def test_every_call_gets_its_own_span_id() -> None:
    a, b = _h()["X-LLMObserve-Span-ID"], _h()["X-LLMObserve-Span-ID"]
    assert a != b and len(a) == 16


def test_section_decorator_sync_and_async(spans: list[dict[str, Any]]) -> None:
    """As a decorator, a section wraps each call (sync and async) in its own span."""

    @llmobserve.section("step")
    def work(x: int) -> str:
        return _h()["X-LLMObserve-Section-Path"] + str(x)

    @llmobserve.section("astep")
    async def awork(x: int) -> str:
        await asyncio.sleep(0)
        return _h()["X-LLMObserve-Section-Path"] + str(x)

    with llmobserve.section("outer"):
        assert work(1) == "outer/step1"
        assert asyncio.run(awork(2)) == "outer/astep2"
    assert work(3) == "step3"
    assert [s["section_path"] for s in spans] == ["outer/step", "outer/astep", "outer", "step"]
    assert spans[0]["parent_span_id"] == spans[2]["span_id"]


def test_async_with(spans: list[dict[str, Any]]) -> None:
    async def main() -> str:
        async with llmobserve.section("a"):
            return _h()["X-LLMObserve-Section-Path"]

    assert asyncio.run(main()) == "a"
    assert spans[0]["name"] == "a"


def test_span_records_status_and_duration(spans: list[dict[str, Any]]) -> None:
    """A section that raises is recorded with status "error"; times are consistent."""
    with pytest.raises(ValueError), llmobserve.section("boom"):
        raise ValueError("x")
    with llmobserve.customer("c1", tenant_id="t1"), llmobserve.section("fine"):
        pass
    boom, fine = spans
    assert boom["status"] == "error" and fine["status"] == "ok"
    assert fine["customer_id"] == "c1" and fine["tenant_id"] == "t1"
    assert fine["end"] >= fine["start"] and fine["duration_ms"] >= 0
    assert set(fine) == {
        "span_id",
        "parent_span_id",
        "run_id",
        "name",
        "section_path",
        "start",
        "end",
        "duration_ms",
        "status",
        "customer_id",
        "tenant_id",
    }


def test_customer_and_setters() -> None:
    """customer() is scoped; set_* change the current context; defaults fill gaps."""
    _context.set_defaults("default-cust", "default-tenant")
    h = _h()
    assert h["X-LLMObserve-Customer-ID"] == "default-cust"
    assert h["X-LLMObserve-Tenant-ID"] == "default-tenant"
    with llmobserve.customer("acme"):
        assert _h()["X-LLMObserve-Customer-ID"] == "acme"
        assert _h()["X-LLMObserve-Tenant-ID"] == "default-tenant"
    assert _h()["X-LLMObserve-Customer-ID"] == "default-cust"

    def in_thread() -> None:
        llmobserve.set_customer_id("bob")
        llmobserve.set_run_id("run-7")
        llmobserve.set_tenant_id("t2")
        llmobserve.set_property("Plan", "pro")
        h = _h()
        assert h["X-LLMObserve-Customer-ID"] == "bob"
        assert h["X-LLMObserve-Run-ID"] == "run-7"
        assert h["X-LLMObserve-Tenant-ID"] == "t2"
        assert h["X-LLMObserve-Property-Plan"] == "pro"

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert _h()["X-LLMObserve-Customer-ID"] == "default-cust"
    assert "X-LLMObserve-Property-Plan" not in _h()


def test_properties_context_manager_and_validation() -> None:
    with llmobserve.properties(feature="summarise", tier="free"):
        h = _h()
        assert h["X-LLMObserve-Property-feature"] == "summarise"
        assert h["X-LLMObserve-Property-tier"] == "free"
    assert not any(k.startswith("X-LLMObserve-Property") for k in _h())
    with pytest.raises(ValueError):
        llmobserve.set_property("bad name", "x")


def test_header_values_cannot_inject() -> None:
    """Labels with CR/LF or non-ASCII are percent-encoded: one header line, ASCII only."""
    with llmobserve.customer("evil\r\nX-Injected: 1"), llmobserve.section("café/ü"):
        h = _h()
    assert h["X-LLMObserve-Customer-ID"] == "evil%0D%0AX-Injected: 1"
    assert h["X-LLMObserve-Section"] == "caf%C3%A9/%C3%BC"
    assert all(v.isascii() and v.isprintable() for v in h.values())


def test_threads_never_see_each_other() -> None:
    """Many threads set their own customer and section; each sees only its own."""
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        with llmobserve.customer(f"c{i}"), llmobserve.section(f"s{i}"):
            barrier.wait()
            for _ in range(200):
                h = _h()
                if (
                    h.get("X-LLMObserve-Customer-ID") != f"c{i}"
                    or h["X-LLMObserve-Section-Path"] != f"s{i}"
                ):
                    errors.append(f"thread {i} saw {h}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_asyncio_tasks_never_see_each_other() -> None:
    """Concurrent tasks interleave at every await; each keeps its own context."""

    async def task(i: int) -> list[str]:
        seen = []
        llmobserve.set_customer_id(f"c{i}")
        async with llmobserve.section(f"s{i}"):
            for _ in range(50):
                await asyncio.sleep(0)
                h = _h()
                seen.append(f"{h['X-LLMObserve-Customer-ID']}|{h['X-LLMObserve-Section-Path']}")
        return seen

    async def main() -> list[list[str]]:
        with llmobserve.section("root"):
            return await asyncio.gather(*(task(i) for i in range(10)))

    results = asyncio.run(main())
    for i, seen in enumerate(results):
        assert set(seen) == {f"c{i}|root/s{i}"}
    assert current().customer_id is None


def test_export_import_carries_context_to_a_worker() -> None:
    """export_context() in the producer, import_context() in a worker thread."""
    llmobserve.set_run_id("run-42")
    with llmobserve.customer("acme", tenant_id="t"), llmobserve.section("job"):
        with llmobserve.properties(queue="emails"):
            exported = export_context()
            parent_span = current().span_id
    import json

    exported = json.loads(json.dumps(exported))  # survives a queue
    got: dict[str, str] = {}

    def worker() -> None:
        with llmobserve.import_context(exported), llmobserve.section("task"):
            got.update(_h())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got["X-LLMObserve-Run-ID"] == "run-42"
    assert got["X-LLMObserve-Customer-ID"] == "acme"
    assert got["X-LLMObserve-Section-Path"] == "job/task"
    assert got["X-LLMObserve-Property-queue"] == "emails"
    with pytest.raises(ValueError):
        with llmobserve.import_context({"nope": 1}):
            pass
    assert parent_span is not None


def export_context() -> dict[str, Any]:
    return llmobserve.export_context()
