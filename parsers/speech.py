"""Speech APIs: text-to-speech billed by characters, speech-to-text billed by duration.

ElevenLabs, Deepgram, AssemblyAI, PlayHT, Azure Speech, Amazon Polly and
Amazon Transcribe. Characters come from the request text (marked
estimated) unless the API reports them; durations come from the response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qs

from ._call import Call
from ._draft import UsageDraft, as_count, as_number, get_path
from .jsonbody import BodyError

__all__ = ["SPEECH_PARSERS"]

_TAGS = re.compile(rb"<[^>]{0,2000}>")


def _json(call: Call, draft: UsageDraft) -> object:
    if not call.body or call.body.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return call.json()
    except BodyError as exc:
        draft.error(str(exc))
        return None


def _chars_from_request(call: Call, draft: UsageDraft, field: str) -> None:
    text = call.request_field(field)
    if isinstance(text, str):
        draft.estimate("characters", len(text))
    elif call.exchange.request_body_truncated:
        draft.flag("request_truncated")


def parse_elevenlabs(call: Call, draft: UsageDraft) -> None:
    path = call.path
    if "/text-to-speech" in path:
        draft.endpoint = "text_to_speech"
        reported = call.exchange.response_headers.get(
            "character-cost"
        ) or call.exchange.response_headers.get("x-character-count")
        if as_count(reported) is not None:
            draft.set("characters", reported)
        else:
            _chars_from_request(call, draft, "text")
        model = call.request_field("model_id")
        draft.model = model if isinstance(model, str) else "eleven_multilingual_v2"
    elif "/speech-to-text" in path:
        draft.endpoint = "speech_to_text"
        draft.model = call.form_field("model_id")
        body = _json(call, draft)
        words = get_path(body, "words")
        if isinstance(words, list) and words and isinstance(words[-1], dict):
            end = as_number(words[-1].get("end"))
            if end is not None:
                draft.estimate("audio_seconds", end)
    else:
        draft.endpoint = path.strip("/").split("/")[1] if path.count("/") > 1 else "other"
        draft.unpriced_reason = "no per-request price for this ElevenLabs endpoint"


def parse_deepgram(call: Call, draft: UsageDraft) -> None:
    params = parse_qs(call.exchange.query, max_num_fields=50)
    model = params.get("model", [None])[0]
    if call.path.rstrip("/").endswith("/speak"):
        draft.endpoint = "speak"
        draft.model = model or "aura-asteria-en"
        reported = call.exchange.response_headers.get("dg-char-count")
        if as_count(reported) is not None:
            draft.set("characters", reported)
        else:
            _chars_from_request(call, draft, "text")
        return
    draft.endpoint = "listen" if "/listen" in call.path else call.path.rsplit("/", 1)[-1]
    body = _json(call, draft)
    meta = get_path(body, "metadata")
    if isinstance(meta, dict):
        draft.set("audio_seconds", meta.get("duration"))
        rid = meta.get("request_id")
        if isinstance(rid, str):
            draft.response_id = rid[:200]
        info = meta.get("model_info")
        if isinstance(info, dict) and not model:
            first = next(iter(info.values()), None)
            if isinstance(first, dict) and isinstance(first.get("name"), str):
                model = first["name"]
    draft.model = model or "nova-2"
    if draft.endpoint == "listen" and "audio_seconds" not in draft.usage:
        draft.flag("no_usage_in_response")


def parse_assemblyai(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = "transcript" if "/transcript" in call.path else call.path.rsplit("/", 1)[-1]
    body = _json(call, draft)
    if not isinstance(body, dict):
        return
    model = body.get("speech_model") or call.request_field("speech_model")
    draft.model = model if isinstance(model, str) else "best"
    status = body.get("status")
    if status == "completed" and call.exchange.method.upper() == "GET":
        # The finished transcript is where the billed duration appears.
        draft.set("audio_seconds", body.get("audio_duration"))
    else:
        draft.unpriced_reason = "billed when the transcript completes (priced on that GET)"
    if isinstance(body.get("id"), str):
        draft.response_id = body["id"][:200]


def parse_playht(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = "tts" if "/tts" in call.path else call.path.rsplit("/", 1)[-1]
    if draft.endpoint == "tts":
        _chars_from_request(call, draft, "text")
        model = call.request_field("voice_engine")
        draft.model = model if isinstance(model, str) else "Play3.0-mini"
    else:
        draft.unpriced_reason = "no per-request price for this PlayHT endpoint"


def parse_azure_speech(call: Call, draft: UsageDraft) -> None:
    host = call.exchange.host
    if ".tts." in host or (
        call.path.endswith("/cognitiveservices/v1") and b"<speak" in call.request_body[:4096]
    ):
        draft.endpoint = "text_to_speech"
        draft.model = "neural"
        ssml = call.request_body
        if call.exchange.request_body_truncated:
            draft.flag("request_truncated")
        # Azure bills the characters of the SSML text content (tags excluded).
        draft.estimate("characters", len(_TAGS.sub(b"", ssml).decode("utf-8", "replace").strip()))
        return
    draft.endpoint = "speech_to_text"
    draft.model = "standard"
    body = _json(call, draft)
    ticks = as_number(get_path(body, "Duration")) if isinstance(body, dict) else None
    if ticks is None and isinstance(body, dict):
        ms = as_number(body.get("durationMilliseconds"))
        ticks = ms * 10_000 if ms is not None else None
    if ticks is not None:
        draft.set("audio_seconds", ticks / 10_000_000)  # 100-ns ticks
    else:
        draft.flag("no_usage_in_response")


def parse_polly(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = (
        "synthesize_speech"
        if call.path.rstrip("/").endswith("/speech")
        else call.path.rsplit("/", 1)[-1]
    )
    if draft.endpoint != "synthesize_speech":
        draft.unpriced_reason = "no per-request price for this Polly operation"
        return
    engine = call.request_field("Engine")
    draft.model = engine.lower() if isinstance(engine, str) else "standard"
    reported = call.exchange.response_headers.get("x-amzn-requestcharacters")
    if as_count(reported) is not None:
        draft.set("characters", reported)
    else:
        _chars_from_request(call, draft, "Text")


def parse_transcribe(call: Call, draft: UsageDraft) -> None:
    target = call.exchange.request_headers.get("x-amz-target", "")
    action = target.rsplit(".", 1)[-1] if target else call.path.rsplit("/", 1)[-1]
    draft.endpoint = action or "transcribe"
    draft.model = "standard"
    draft.unpriced_reason = "Transcribe bills the audio length, which these calls do not report"


SPEECH_PARSERS: dict[str, Callable[[Call, UsageDraft], None]] = {
    "elevenlabs": parse_elevenlabs,
    "deepgram": parse_deepgram,
    "assemblyai": parse_assemblyai,
    "playht": parse_playht,
    "azure_speech": parse_azure_speech,
    "aws_polly": parse_polly,
    "aws_transcribe": parse_transcribe,
}
