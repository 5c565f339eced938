"""Speech, image/video, vector, search, payment and messaging providers: one row each."""

from __future__ import annotations

from typing import Any

import pytest
from parsers_testkit import exchange

from parsers import analyse

# (host, method, path, response, request, extra, endpoint, usage, cost or None, ref prefix)
ROWS: list[tuple[Any, ...]] = [
    (
        "api.elevenlabs.io",
        "POST",
        "/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM",
        b"MP3",
        {"text": "Hello there", "model_id": "eleven_multilingual_v2"},
        {"content_type": "audio/mpeg"},
        "text_to_speech",
        {"characters": 11},
        11 * 100 / 1e6,
        "llmobserve:elevenlabs/eleven_multilingual*",
    ),
    (
        "api.deepgram.com",
        "POST",
        "/v1/listen",
        {
            "metadata": {
                "request_id": "r1",
                "duration": 120.0,
                "channels": 1,
                "model_info": {"x": {"name": "2-general-nova", "version": "1"}},
            },
            "results": {},
        },
        b"RIFF",
        {"query": "model=nova-3&smart_format=true"},
        "listen",
        {"audio_seconds": 120.0},
        120 / 3600 * 0.258,
        "llmobserve:deepgram/nova-3*",
    ),
    (
        "api.deepgram.com",
        "POST",
        "/v1/speak",
        b"MP3",
        {"text": "Hi there"},
        {"query": "model=aura-asteria-en", "content_type": "audio/mpeg"},
        "speak",
        {"characters": 8},
        None,  # no Aura price traced to Deepgram's pricing page (prices.json)
        "no sourced price for deepgram/aura-asteria-en",
    ),
    (
        "api.assemblyai.com",
        "GET",
        "/v2/transcript/abc",
        {"id": "abc", "status": "completed", "audio_duration": 3600, "speech_model": "universal"},
        None,
        {},
        "transcript",
        {"audio_seconds": 3600},
        0.15,
        "llmobserve:assemblyai/universal",
    ),
    (
        "api.stability.ai",
        "POST",
        "/v2beta/stable-image/generate/ultra",
        b"PNG",
        b"form",
        {"content_type": "image/png"},
        "stable-image.generate",
        {"images": 1},
        0.08,
        "llmobserve:stability/stable-image-ultra",
    ),
    (
        "api.dev.runwayml.com",
        "POST",
        "/v1/image_to_video",
        {"id": "task-1"},
        {"model": "gen4_turbo", "promptImage": "https://x", "duration": 10},
        {},
        "image_to_video",
        {"requests": 1},
        None,  # Runway's credit prices could not be traced to a pricing page
        "no sourced price for runway/gen4_turbo",
    ),
    (
        "westeurope.tts.speech.microsoft.com",
        "POST",
        "/cognitiveservices/v1",
        b"RIFF",
        b"<speak version='1.0'><voice name='en-US-AvaNeural'>Hello world</voice></speak>",
        {"content_type": "audio/wav"},
        "text_to_speech",
        {"characters": 11},
        None,  # Azure Speech's rates could not be traced to its pricing page
        "no sourced price for azure_speech/neural",
    ),
    (
        "polly.us-east-1.amazonaws.com",
        "POST",
        "/v1/speech",
        b"MP3",
        {"Text": "Hello", "Engine": "neural", "OutputFormat": "mp3", "VoiceId": "Joanna"},
        {"response_headers": {"x-amzn-requestcharacters": "5"}, "content_type": "audio/mpeg"},
        "synthesize_speech",
        {"characters": 5},
        5 * 16 / 1e6,
        "llmobserve:aws_polly/neural",
    ),
    (
        "latency-dsn.algolia.net",
        "POST",
        "/1/indexes/*/queries",
        {"results": [{}, {}]},
        {"requests": [{"indexName": "a"}, {"indexName": "b"}]},
        {},
        "query",
        {"requests": 2},
        0.001,
        "llmobserve:algolia/",
    ),
    (
        "in03-abc.serverless.gcp-us-west1.cloud.zilliz.com",
        "POST",
        "/v2/vectordb/entities/search",
        {"code": 0, "cost": 6, "data": []},
        {"collectionName": "c"},
        {},
        "query",
        {"read_units": 6},
        None,
        "no price",
    ),
    (
        "api.twilio.com",
        "POST",
        "/2010-04-01/Accounts/AC123/Messages.json",
        {"sid": "SM1", "status": "queued", "num_segments": "2", "price": None, "price_unit": "USD"},
        b"To=%2B1&Body=hi",
        {},
        "messages",
        {"requests": 2},
        0.0166,
        "llmobserve:twilio/",
    ),
    (
        "api.twilio.com",
        "GET",
        "/2010-04-01/Accounts/AC123/Messages/SM1.json",
        {
            "sid": "SM1",
            "status": "delivered",
            "num_segments": "1",
            "price": "-0.00790",
            "price_unit": "USD",
        },
        None,
        {},
        "messages",
        {"requests": 1},
        0.0079,
        "reported:twilio",
    ),
]


@pytest.mark.parametrize(
    (
        "host",
        "method",
        "path",
        "response",
        "request_body",
        "extra",
        "endpoint",
        "usage",
        "cost",
        "ref",
    ),
    ROWS,
)
def test_provider_rows(
    host: str,
    method: str,
    path: str,
    response: Any,
    request_body: Any,
    extra: dict[str, Any],
    endpoint: str,
    usage: dict[str, Any],
    cost: float | None,
    ref: str,
) -> None:
    """Each provider's endpoint, usage and price (or the reason there is none)."""
    record = analyse(exchange(host, path, response, request=request_body, method=method, **extra))
    assert record.endpoint == endpoint
    assert dict(record.usage) == usage
    if cost is None:
        assert record.cost_usd is None
    else:
        assert record.cost_usd == pytest.approx(cost)
    assert record.price_ref is not None and record.price_ref.startswith(ref), record.price_ref
    assert record.parse_error is None


@pytest.mark.parametrize(
    ("host", "path", "provider"),
    [
        ("api.stripe.com", "/v1/payment_intents", "stripe"),
        ("api-m.paypal.com", "/v2/checkout/orders", "paypal"),
        ("api.sendgrid.com", "/v3/mail/send", "sendgrid"),
        ("abcdefgh.supabase.co", "/rest/v1/todos", "supabase"),
        ("xyz.us-east4-0.gcp.cloud.qdrant.io", "/collections/c/points/search", "qdrant"),
        ("api.trychroma.com", "/api/v2/tenants/t/databases/d/collections/c/query", "chroma"),
        ("api.replicate.com", "/v1/predictions", "replicate"),
        ("transcribe.us-east-1.amazonaws.com", "/", "aws_transcribe"),
        ("api.play.ht", "/api/v2/voices", "playht"),
    ],
)
def test_unpriced_calls_say_why(host: str, path: str, provider: str) -> None:
    """Calls with no per-request price: cost null and a price_ref giving the reason."""
    record = analyse(exchange(host, path, {"id": "x"}, request={"to": [{"email": "a@b.c"}]}))
    assert record.provider == provider
    assert record.cost_usd is None
    assert record.price_ref is not None and record.price_ref.startswith("not priced:")


def test_unknown_host_is_still_a_record() -> None:
    """A host with no provider: 'unknown', with a reason and no usage."""
    record = analyse(exchange("api.example.com", "/v1/things", {"ok": True}))
    assert record.provider == "unknown"
    assert record.usage_source == "missing"
    assert record.cost_usd is None
