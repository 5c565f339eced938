"""Image and video generation APIs and hosted-model platforms.

Stability (per image, by model), Runway (per video, by model and
duration), Replicate and Hugging Face's serverless inference (no usage in
the response; Hugging Face's OpenAI-compatible router goes to L{openai}).
"""

from __future__ import annotations

from collections.abc import Callable

from ._call import Call
from ._draft import UsageDraft, as_count, as_number, get_path
from .jsonbody import BodyError
from .openai import parse_openai

__all__ = ["MEDIA_PARSERS"]


def parse_stability(call: Call, draft: UsageDraft) -> None:
    parts = [p for p in call.path.split("/") if p]
    draft.endpoint = (
        ".".join(parts[1:3]) if len(parts) >= 3 else (parts[-1] if parts else "unknown")
    )
    if call.exchange.status is None or call.exchange.status >= 300:
        draft.unpriced_reason = "failed generations are not billed"
        return
    model: str | None = None
    if "stable-image" in parts:
        kind = parts[-1]
        if kind == "sd3":
            form_model = call.form_field("model")
            model = form_model or "sd3.5-large"
        else:
            model = f"stable-image-{kind}"
        draft.estimate("images", 1)
    elif "generation" in parts and len(parts) >= 3:
        model = parts[parts.index("generation") + 1]
        count = 1
        if call.body.lstrip()[:1] == b"{":
            try:
                body = call.json()
                artifacts = body.get("artifacts") if isinstance(body, dict) else None
                if isinstance(artifacts, list):
                    count = len(artifacts)
            except BodyError as exc:
                draft.error(str(exc))
        draft.set("images", count)
    else:
        draft.unpriced_reason = "no per-request price for this Stability endpoint"
    draft.model = model


def parse_runway(call: Call, draft: UsageDraft) -> None:
    parts = [p for p in call.path.split("/") if p]
    draft.endpoint = parts[-1] if parts else "unknown"
    if draft.endpoint in ("image_to_video", "text_to_video", "video_to_video"):
        model = call.request_field("model")
        duration = as_count(call.request_field("duration")) or 5
        draft.model = model if isinstance(model, str) else None
        draft.details["video_seconds"] = duration
        draft.estimate("requests", 1)
        draft.price_item = f"video/{duration}s"
        body = _json(call)
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            draft.response_id = body["id"][:200]
    else:
        draft.unpriced_reason = "task polling is not billed"


def parse_replicate(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = "predictions" if "/predictions" in call.path else call.path.rsplit("/", 1)[-1]
    body = _json(call)
    if isinstance(body, dict):
        model = body.get("model") or body.get("version")
        if isinstance(model, str):
            draft.model = model[:200]
        seconds = as_number(get_path(body, "metrics", "predict_time"))
        if seconds is not None:
            draft.details["predict_time_s"] = seconds
        if isinstance(body.get("id"), str):
            draft.response_id = body["id"][:200]
    draft.unpriced_reason = "Replicate bills hardware time, which depends on the model's hardware"


def parse_huggingface(call: Call, draft: UsageDraft) -> None:
    if (
        "/chat/completions" in call.path
        or "/v1/" in call.path
        or call.path.endswith("/completions")
    ):
        parse_openai(call, draft)
        return
    parts = [p for p in call.path.split("/") if p]
    if "models" in parts:
        at = parts.index("models")
        draft.model = "/".join(parts[at + 1 : at + 3]) or None
    draft.endpoint = "inference"
    draft.unpriced_reason = "serverless inference reports no usage (billed by compute time)"


def _json(call: Call) -> object:
    if call.body.lstrip()[:1] != b"{":
        return None
    try:
        return call.json()
    except BodyError:
        return None


MEDIA_PARSERS: dict[str, Callable[[Call, UsageDraft], None]] = {
    "stability": parse_stability,
    "runway": parse_runway,
    "replicate": parse_replicate,
    "huggingface": parse_huggingface,
}
