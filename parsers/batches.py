"""Batch API results files: the usage of every request in a batch, at batch prices.

OpenAI (C{/v1/batches}) and Anthropic (Message Batches) bill a batch's
requests at half the usual price, when they run. Neither says so in
the call that creates the batch; the usage of each request only
appears in the results file, a JSON Lines body with one line per
request:

 - OpenAI, C{GET /v1/files/{output_file_id}/content}:
   C{{"custom_id": ..., "response": {"status_code": 200, "body": {chat
   completion, with "model" and "usage"}}}};
 - Anthropic, C{GET /v1/messages/batches/{id}/results}:
   C{{"custom_id": ..., "result": {"type": "succeeded", "message":
   {message, with "model" and "usage"}}}}.

So the download of a results file through the proxy is the call priced:
its lines' usage summed, the model theirs, at genai-prices's batch prices
(price context C{processing: batch}) or, where its data has none, half
the standard ones (L{parsers._modifiers}). A file whose lines name more than one
model is not priced (one event has one model): C{price_ref} says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._call import Call
from ._draft import UsageDraft, get_path
from .jsonbody import BodyError, loads

__all__ = ["is_batch_output", "read_batch_output"]

_MAX_LINES = 100_000


def is_batch_output(body: bytes) -> bool:
    """True when C{body} starts like a batch results file (JSON Lines with C{custom_id})."""
    head = body[:512].lstrip()
    return head[:1] == b"{" and b'"custom_id"' in body[:4096]


def read_batch_output(
    call: Call,
    draft: UsageDraft,
    read_usage: Callable[[Any, UsageDraft], object],
) -> None:
    """Sum the usage of a batch results file into C{draft} and mark it a batch.

    @param read_usage: the provider's usage reader, C{(usage, draft)}.
    """
    draft.batch = True
    draft.price_context["processing"] = "batch"
    draft.endpoint = "batch.results"
    if call.body_truncated:
        draft.unpriced_reason = "batch results longer than the copy kept for parsing"
        return
    models: dict[str, None] = {}
    totals: dict[str, int | float] = {}
    requests = results = 0
    for n, line in enumerate(call.body.splitlines()):
        if n >= _MAX_LINES:
            draft.flag("batch_results_cut")
            break
        if not line.strip():
            continue
        try:
            row = loads(line)
        except BodyError as exc:
            draft.error(f"bad batch results line: {exc}")
            continue
        if isinstance(row, dict) and ("response" in row or "result" in row):
            results += 1
        message = get_path(row, "response", "body")
        if not isinstance(message, dict):
            message = get_path(row, "result", "message")
        if not isinstance(message, dict) or not isinstance(message.get("usage"), dict):
            continue  # a failed or expired request: not billed
        one = UsageDraft()
        read_usage(message["usage"], one)
        for key, value in one.usage.items():
            totals[key] = totals.get(key, 0) + value
        if isinstance(message.get("model"), str):
            models[message["model"]] = None
        requests += 1
    if not results:  # a batch's input file (requests, no answers): not billed
        draft.batch = False
        draft.price_context.pop("processing", None)
        draft.endpoint = "batch.input"
        draft.unpriced_reason = "a batch input file is not billed"
        return
    draft.details["batch_requests"] = requests
    for key, value in totals.items():
        draft.set(key, value)
    if len(models) > 1:
        names = ", ".join(list(models)[:5])
        draft.unpriced_reason = f"batch results mix models ({names}): one event has one model"
    elif models:
        draft.model = next(iter(models))
