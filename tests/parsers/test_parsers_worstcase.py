"""parsers.worst_case: the most a request can cost, from its body, before it is sent."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import worst_case
from parsers._plainbody import decode_plain
from parsers._worstcase import (
    _ANY_PART,
    _AUDIO_PART,
    _FILE_PART,
    _FILE_URI,
    _IMAGE_PART,
    _SERVER_STATE,
    _SERVER_TOOL,
    IMAGE_PART_TOKENS,
    _worst_case_any,
    worst_case_fields,
)
from parsers.pricing import PRICER

WHEN = 1_750_000_000.0


def bound(body: Any, provider: str | None = "openai", path: str = "/v1/chat/completions") -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return worst_case(provider, "api.example.com", path, raw, len(raw), WHEN)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_output_limits_each_api_names() -> None:
    """max_tokens, max_completion_tokens, max_output_tokens and Gemini's
    generationConfig.maxOutputTokens bound the output; n multiplies it."""
    assert bound(chat(max_tokens=100)).output_tokens == 100
    assert bound(chat(max_completion_tokens=200)).output_tokens == 200
    assert bound(chat(max_output_tokens=300)).output_tokens == 300
    assert bound(chat(max_tokens=100, n=3)).output_tokens == 300
    gemini = bound(
        {"contents": [], "generationConfig": {"maxOutputTokens": 50}},
        provider="gemini",
        path="/v1beta/models/gemini-2.5-flash:generateContent",
    )
    assert (gemini.model, gemini.output_tokens) == ("gemini-2.5-flash", 50)


def test_no_output_limit_uses_the_models_maximum_or_gives_no_bound() -> None:
    """Absent a limit: the model's maximum output; a model with none known has no bound."""
    assert bound(chat()).output_tokens == 16_384
    unknown = bound({"model": "someone-else-7b", "messages": []})
    assert unknown.cost_usd is None and "no output limit" in (unknown.reason or "")


def test_input_is_bounded_by_bytes_plus_image_parts() -> None:
    """Each image part adds the per-part allowance; audio parts cannot be bounded."""
    text = bound(chat(max_tokens=1))
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    two = chat(max_tokens=1, messages=[{"role": "user", "content": [image, image]}])
    with_images = bound(two)
    assert with_images.input_tokens >= text.input_tokens + 2 * IMAGE_PART_TOKENS
    audio = chat(
        max_tokens=1,
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
    )
    assert bound(audio).cost_usd is None


def test_files_documents_and_audio_references_cannot_be_bounded() -> None:
    """A PDF or other file (OpenAI's file and input_file parts, Anthropic's
    document), a Gemini file by URI that is not an image, an earlier
    answer's audio by id, and audio asked for as output: no byte count
    bounds them, so the call has no bound (a budget treats it as unpriced).
    A Gemini image by URI is still an image."""

    def user(*parts: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": list(parts)}]

    pdf = {"type": "file", "file": {"file_id": "file-abc"}}
    assert bound(chat(max_tokens=1, messages=user(pdf))).reason == "file parts cannot be bounded"
    responses = {
        "model": "gpt-4o-mini",
        "max_output_tokens": 1,
        "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}],
    }
    assert bound(responses, path="/v1/responses").reason == "file parts cannot be bounded"
    document = {"type": "document", "source": {"type": "url", "url": "https://e.com/a.pdf"}}
    anthropic = {"model": "claude-sonnet-4-20250514", "max_tokens": 1, "messages": user(document)}
    assert bound(anthropic, "anthropic", "/v1/messages").reason == "file parts cannot be bounded"

    def gemini(mime: str) -> Any:
        part = {"fileData": {"mimeType": mime, "fileUri": "gs://b/f"}}
        doc = {"contents": [{"parts": [part]}], "generationConfig": {"maxOutputTokens": 5}}
        return bound(doc, "gemini", "/v1beta/models/gemini-2.0-flash:generateContent")

    assert gemini("video/mp4").reason == "file parts cannot be bounded"
    assert gemini("application/pdf").reason == "file parts cannot be bounded"
    assert gemini("image/jpeg").cost_usd is not None
    earlier = [
        {"role": "assistant", "audio": {"id": "audio_abc"}},
        {"role": "user", "content": "?"},
    ]
    assert bound(chat(max_tokens=1, messages=earlier)).reason == "audio parts cannot be bounded"
    spoken = chat(max_tokens=1, modalities=["text", "audio"], audio={"voice": "alloy"})
    assert bound(spoken).reason == "audio parts cannot be bounded"
    # the words alone are not parts
    words = chat(max_tokens=1, messages=[{"role": "user", "content": "a file, a document"}])
    assert bound(words).cost_usd is not None


def test_input_the_provider_holds_or_fetches_cannot_be_bounded() -> None:
    """An earlier response, a conversation, a stored prompt or item, cached
    content, and tools the provider runs itself (web search, file search,
    code execution, MCP servers, image generation) put input before the
    model that the body does not hold: the call has no bound (a budget
    treats it as unpriced). Function tools, client-run tools, an earlier
    call's records passed back, a legacy string prompt and keys that only
    look alike are still bounded."""
    responses = {"model": "gpt-4o-mini", "max_output_tokens": 5, "input": "go on"}
    held = "input the provider adds ({}) cannot be bounded"
    for field, value in [
        ("previous_response_id", "resp_abc"),
        ("conversation", "conv_abc"),
        ("conversation", {"id": "conv_abc"}),
        ("prompt", {"id": "pmpt_abc", "variables": {"city": "Paris"}}),
    ]:
        reason = bound({**responses, field: value}, path="/v1/responses").reason
        assert reason == held.format(field), (field, reason)
    assert bound(chat(max_tokens=5, web_search_options={})).reason == held.format(
        "web_search_options"
    )
    gemini_path = "/v1beta/models/gemini-2.0-flash:generateContent"
    cached = {
        "contents": [{"parts": [{"text": "hi"}]}],
        "cachedContent": "cachedContents/abc",
        "generationConfig": {"maxOutputTokens": 5},
    }
    assert bound(cached, "gemini", gemini_path).reason == held.format("cachedContent")

    tool_run = "input a provider-run tool or a stored item brings cannot be bounded"
    for tool in [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation"},
        {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com"},
    ]:
        assert bound({**responses, "tools": [tool]}, path="/v1/responses").reason == tool_run
    reference = {**responses, "input": [{"type": "item_reference", "id": "msg_abc"}]}
    assert bound(reference, path="/v1/responses").reason == tool_run
    claude = {"model": "claude-sonnet-4-20250514", "max_tokens": 5, "messages": chat()["messages"]}
    for tool in [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "code_execution_20250825", "name": "code_execution"},
    ]:
        assert bound({**claude, "tools": [tool]}, "anthropic", "/v1/messages").reason == tool_run
    mcp = [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]
    assert bound({**claude, "mcp_servers": mcp}, "anthropic", "/v1/messages").reason == held.format(
        "mcp_servers"
    )
    for tool in [
        {"googleSearch": {}},
        {"google_search": {}},
        {"codeExecution": {}},
        {"urlContext": {}},
    ]:
        assert (
            bound({**cached, "cachedContent": None, "tools": [tool]}, "gemini", gemini_path).reason
            == tool_run
        )

    function = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bounded = [
        ("openai", "/v1/chat/completions", chat(max_tokens=5, tools=[function])),
        ("openai", "/v1/responses", {**responses, "tools": [{"type": "function", "name": "f"}]}),
        (
            "openai",
            "/v1/responses",
            {**responses, "prompt_cache_key": "k", "previous_response_id": None},
        ),
        (
            "openai",
            "/v1/responses",
            {
                **responses,
                "input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}],
            },
        ),
        (
            "openai",
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5},
        ),
        (
            "anthropic",
            "/v1/messages",
            {**claude, "tools": [{"type": "bash_20250124", "name": "bash"}], "mcp_servers": []},
        ),
        ("anthropic", "/v1/messages", {**claude, "metadata": {"conversation_id": "c"}}),
        (
            "gemini",
            gemini_path,
            {**cached, "cachedContent": None, "tools": [{"functionDeclarations": []}]},
        ),
    ]
    for provider, path, doc in bounded:
        found = bound(doc, provider, path)
        assert found.cost_usd is not None or found.reason == "no price", (doc, found.reason)
        assert found.reason in (None, "no price"), (doc, found.reason)


def test_stored_items_search_models_and_provider_extras_cannot_be_bounded() -> None:
    """Responses' input naming a stored item by id alone (its type may be
    left out) or a reasoning item with no encrypted content; models that
    search on every call; Azure's data sources, xAI's live search,
    OpenRouter's plugins, Gemini's cached content through its
    OpenAI-compatible API; Vertex AI's retrieval tools: no bound. A
    Gemini tool by key counts only as an element of the top-level tools,
    not as a function's parameter or a key of the metadata."""
    responses = {"model": "gpt-4o-mini", "max_output_tokens": 5}
    run = "input a provider-run tool or a stored item brings cannot be bounded"
    for items in [
        [{"id": "msg_abc"}],
        [{"type": "reasoning", "id": "rs_abc", "summary": []}],
    ]:
        assert bound({**responses, "input": items}, path="/v1/responses").reason == run
    kept = [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]
    assert bound({**responses, "input": kept}, path="/v1/responses").cost_usd is not None
    said = [{"id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}]
    assert bound({**responses, "input": said}, path="/v1/responses").cost_usd is not None

    for model in ["gpt-4o-mini-search-preview", "sonar-pro", "openai/gpt-4o:online"]:
        found = bound(chat(model=model, max_tokens=5))
        assert found.reason == f"{model} searches the web: its input cannot be bounded"
    held = "input the provider adds ({}) cannot be bounded"
    for field, value in [
        ("data_sources", [{"type": "azure_search", "parameters": {}}]),
        ("search_parameters", {"mode": "auto"}),
        ("plugins", [{"id": "web"}]),
    ]:
        assert bound(chat(max_tokens=5, **{field: value})).reason == held.format(field)
    compat = chat(max_tokens=5, extra_body={"google": {"cached_content": "cachedContents/x"}})
    assert bound(compat).reason == held.format("extra_body.google.cached_content")

    gemini_path = "/v1beta/models/gemini-2.0-flash:generateContent"
    gemini = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}}
    tools: list[dict[str, Any]] = [
        {"retrieval": {}},
        {"enterpriseWebSearch": {}},
        {"google_search": {}},
    ]
    for tool in tools:
        assert bound({**gemini, "tools": [tool]}, "gemini", gemini_path).reason == run
    declared = {
        "functionDeclarations": [{"name": "f", "parameters": {"properties": {"file_search": {}}}}]
    }
    assert bound({**gemini, "tools": [declared]}, "gemini", gemini_path).cost_usd is not None
    no_limit = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert bound({**no_limit, "metadata": {"code_execution": "on"}}).cost_usd is not None


def test_a_gemini_video_by_uri_is_not_taken_for_the_image_beside_it() -> None:
    """Each file by URI is judged by its own MIME type: a video by URL with
    none, next to an inline image or an image's MIME type elsewhere in the
    body, leaves the call without a bound (an hour of video is about a
    million tokens)."""
    path = "/v1beta/models/gemini-2.0-flash:generateContent"
    video = {"fileData": {"fileUri": "https://www.youtube.com/watch?v=x"}}
    image = {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
    doc = {"contents": [{"parts": [video, image]}], "generationConfig": {"maxOutputTokens": 5}}
    assert bound(doc, "gemini", path).reason == "file parts cannot be bounded"
    pictured = {"fileData": {"fileUri": "gs://b/cat.png", "mimeType": "image/png"}}
    doc["contents"] = [{"parts": [pictured, image]}]
    assert bound(doc, "gemini", path).cost_usd is not None


def test_a_body_with_escapes_is_read_as_written_and_as_the_provider_reads_it() -> None:
    """A repeated key keeps both readings (a provider may take the first):
    a server tool's type hidden behind a later "function" is still found.
    A body with escapes that the standard library cannot read (invalid
    UTF-8 in a string) has no bound: its parts could not be looked for."""
    hidden = (
        b'{"model":"gpt-4o-mini","max_output_tokens":5,"input":"\\u0068i",'
        b'"tools":[{"type":"web_search","type":"function","name":"f"}]}'
    )
    assert bound(hidden, path="/v1/responses").reason == (
        "input a provider-run tool or a stored item brings cannot be bounded"
    )
    broken = (
        b'{"model":"gpt-4o-mini","max_tokens":5,"user":"\xff","messages":[{"role":"user",'
        b'"content":[{"type":"\\u0069mage_url","image_url":{"url":"https://x/a.png"}}]}]}'
    )
    assert bound(broken).cost_usd is None


def test_the_one_pass_refuses_every_field_that_adds_input() -> None:
    """The one pass's decoder (decode_plain) knows no field of
    _SERVER_STATE, so that a request setting one goes the full way (which
    says it has no bound): a field added to the decoder, and not to the
    full way's list, would be bounded by the one pass alone."""
    for name in _SERVER_STATE:
        body = json.dumps(chat(max_tokens=5, **{name: {"id": "x"}})).encode()
        with pytest.raises(msgspec.ValidationError):
            decode_plain(body)
        fields = worst_case_fields("openai", "api.example.com", "/v1/x", body, len(body), WHEN)
        assert fields[2] is None, name


def test_unboundable_requests_have_no_cost() -> None:
    """No model, not JSON, a body too big to hold, an unknown price: None, with a reason."""
    assert bound({"messages": []}).reason == "no model named"
    assert bound(b"not json").reason == "request body is not JSON"
    big = worst_case("openai", "api.openai.com", "/v1/chat/completions", None, 10**7, WHEN)
    assert big.cost_usd is None
    assert bound(chat(model="no-such-model-x", max_tokens=5)).reason == "no price"


@settings(max_examples=60, deadline=None)
@given(
    content=st.text(max_size=400),
    max_tokens=st.integers(min_value=1, max_value=5000),
    used_out=st.floats(min_value=0.0, max_value=1.0),
    model=st.sampled_from(["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-20250514"]),
)
def test_the_bound_is_never_below_the_price_of_what_it_allows(
    content: str, max_tokens: int, used_out: float, model: str
) -> None:
    """Any usage within the bound (input tokens <= body bytes, output <= max_tokens)
    is priced at no more than the bound's cost."""
    provider = "anthropic" if model.startswith("claude") else "openai"
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    }
    raw = json.dumps(body).encode()
    worst = worst_case(provider, "h", "/v1/x", raw, len(raw), WHEN)
    assert worst.cost_usd is not None
    used = {"input_tokens": len(raw), "output_tokens": int(max_tokens * used_out)}
    priced = PRICER.price(provider, None if provider == "openai" else provider, model, used, WHEN)
    assert priced.cost_usd is not None
    assert priced.cost_usd <= worst.cost_usd + 1e-12


def test_integers_beyond_64_bits_are_read_exactly() -> None:
    """A float reader (orjson) would read an integer too long for 64 bits
    as a float; the bound must still see the integer (a limit of 10**30 tokens is no small bound),
    and a limit that really is a float is no limit, as before."""
    huge = bound(chat(max_tokens=10**30))
    assert huge.output_tokens == 10**30
    assert bound(chat(max_tokens=10, n=10**25)).output_tokens == 10**26
    assert bound(chat(max_tokens=100.0)).output_tokens == 16_384  # gpt-4o-mini's maximum


def test_keys_are_read_as_the_provider_reads_them() -> None:
    """Only the top-level fields are decoded, and the way a provider's JSON
    reader takes them: a repeated key counts its last value, an escaped
    key name is the key, a key inside a nested object is not the call's."""
    repeated = b'{"model":"gpt-4o-mini","max_tokens":5,"messages":[],"max_tokens":900}'
    assert bound(repeated).output_tokens == 900
    escaped = b'{"model":"gpt-4o-mini","max_tokens":5,"max_tok\\u0065ns":900,"\\u006e":3}'
    assert bound(escaped).output_tokens == 2_700
    nested = chat(metadata={"max_tokens": 1}, tools=[{"max_tokens": 2, "model": "gpt-4o"}])
    assert (bound(nested).model, bound(nested).output_tokens) == ("gpt-4o-mini", 16_384)
    swapped = b'{"model":"gpt-4o-mini","model":"gpt-4o","max_tokens":10}'
    assert bound(swapped).model == "gpt-4o"


def test_malformed_json_anywhere_is_not_json() -> None:
    """The fields the bound skips (the messages) must still be well-formed:
    a body the upstream would refuse is no JSON to bound either."""
    assert bound(b'{"model":"gpt-4o-mini","max_tokens":5,"messages":[1,2,]}').reason == (
        "request body is not JSON"
    )
    assert bound(b'{"model":"gpt-4o-mini","max_tokens":5} trailing').reason == (
        "request body is not JSON"
    )
    assert bound(b'["model", "gpt-4o-mini"]').reason == "no model named"


def test_what_the_fast_reader_refuses_is_read_by_the_stdlib() -> None:
    """A UTF-8 BOM or a number out of a double's range (the fast reader
    refuses them; Python's json reads them) still gives a bound; NaN is
    no JSON (parsers.jsonbody refuses non-finite constants)."""
    assert bound(b'{"model":"gpt-4o-mini","max_tokens":5,"top_p":1e999}').output_tokens == 5
    nan = bound(b'{"model":"gpt-4o-mini","max_tokens":5,"temperature":NaN}')
    assert nan.reason == "request body is not JSON"
    raw = json.dumps(chat(max_tokens=7)).encode()
    with_bom = worst_case(
        "openai",
        "api.example.com",
        "/v1/chat/completions",
        b"\xef\xbb\xbf" + raw,
        len(raw) + 3,
        WHEN,
    )
    assert (with_bom.model, with_bom.output_tokens) == ("gpt-4o-mini", 7)


_MARKERS = (_IMAGE_PART, _AUDIO_PART, _FILE_PART, _FILE_URI, _SERVER_TOOL)
_PIECES = [
    b'"image_url"',
    b'"input_image"',
    b'"inline_data"',
    b'"inlineData"',
    b'"file_data"',
    b'"fileData"',
    b'"input_audio"',
    b'"audio_url"',
    b'"audio"',
    b'"type"',
    b'"image"',
    b'"file"',
    b'"input_file"',
    b'"document"',
    b'"web_search"',
    b'"web_search_20250305"',
    b'"file_search"',
    b'"fileSearch"',
    b'"code_interpreter"',
    b'"code_execution"',
    b'"codeExecution"',
    b'"image_generation"',
    b'"mcp"',
    b'"mcp_servers"',
    b'"googleSearch"',
    b'"google_search_retrieval"',
    b'"url_context"',
    b'"item_reference"',
    b'"tool_search_tool_regex_20251119"',
    b"[",
    b"_2025",
    b'"text"',
    b'"data"',
    b"{",
    b"}",
    b":",
    b" ",
    b"\n",
    b",",
    b'"',
    b"image",
    b"audio",
    b"type",
    b"_url",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.binary(max_size=8))
def test_the_one_pass_prefilter_finds_every_part_marker(pieces: list[bytes], junk: bytes) -> None:
    """The bound runs its exact part markers only where _ANY_PART matches:
    wherever one of them matches, so must it (else a part goes unbounded)."""
    body = junk.join(pieces) if junk else b"".join(pieces)
    if any(marker.search(body) for marker in _MARKERS):
        assert _ANY_PART.search(body) is not None, body


def test_the_prefilter_matches_each_provider_s_parts_and_not_prose() -> None:
    """Each provider's image, audio and file parts pass the prefilter; a
    prompt about data, images and audio files does not."""
    parts = [
        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
        {"type": "input_image", "image_url": "https://x/a.png"},
        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
        {"inline_data": {"mime_type": "image/png", "data": "AAAA"}},
        {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
        {"file_data": {"mime_type": "video/mp4", "file_uri": "gs://x"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
    ]
    for part in parts:
        body = json.dumps(chat(messages=[{"role": "user", "content": [part]}])).encode()
        assert _ANY_PART.search(body) is not None, part
    assert _ANY_PART.search(json.dumps(chat(audio={"voice": "alloy"})).encode())
    prose = "Read the data, describe the image, transcribe the audio file and the document."
    assert (
        _ANY_PART.search(json.dumps(chat(messages=[{"role": "user", "content": prose}])).encode())
        is None
    )


_LIMIT = st.one_of(
    st.integers(-5, 10**6),
    st.integers(2**62, 2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
_PART = st.sampled_from(
    [
        "hi",
        [{"type": "text", "text": "hi"}],
        [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
        [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
        [{"type": "file", "file": {"file_id": "f"}}],
        "a prompt about image_url and inline_data",
    ]
)


@settings(max_examples=400)
@given(
    st.sampled_from(["openai", "anthropic", "google", "groq", None, "no-such-provider"]),
    st.one_of(st.sampled_from(["gpt-4o-mini", "claude-haiku-4-5", "no-such-model"]), _LIMIT),
    st.dictionaries(
        st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens", "n"]),
        _LIMIT,
    ),
    _PART,
    st.sampled_from([b"", b"\xef\xbb\xbf", b" "]),
    st.floats(1_700_000_000, 1_800_000_000),
)
def test_the_one_pass_gives_what_the_full_way_gives(
    provider: str | None, model: Any, limits: dict[str, Any], content: Any, lead: bytes, when: float
) -> None:
    """worst_case_fields takes the common case in one pass: for any request,
    its figures (and reasons) are those of _worst_case_any, which reads
    every provider's format and part."""
    raw = (
        lead
        + json.dumps(
            {"model": model, "messages": [{"role": "user", "content": content}], **limits}
        ).encode()
    )
    args = (provider, "api.example.com", "/v1/chat/completions", raw, len(raw), when)
    _worst_case_any(*args)  # the price of the model and day read: the one pass may apply
    assert worst_case_fields(*args) == _worst_case_any(*args)


def _fields(provider: str, doc: dict[str, Any]) -> Any:
    """Both ways' figures for C{doc} (the full way first: its price read), held equal."""
    raw = json.dumps(doc).encode()
    args = (provider, "api.example.com", "/v1/chat/completions", raw, len(raw), WHEN)
    full = _worst_case_any(*args)
    assert worst_case_fields(*args) == full
    return worst_case(*args)


def test_the_output_limit_is_the_largest_the_provider_reads() -> None:
    """OpenAI (and Azure, Groq, xAI) read max_completion_tokens,
    max_output_tokens and max_tokens: given several, the bound takes the
    largest. Any other provider reads max_tokens alone: DeepSeek, given
    max_completion_tokens only, runs to its own default, so the bound
    takes the model's maximum (none known here: no bound)."""
    both = {"max_tokens": 10, "max_completion_tokens": 500}
    assert _fields("openai", chat(**both)).output_tokens == 500
    assert _fields("openai", chat(max_tokens=700, max_completion_tokens=5)).output_tokens == 700
    deepseek = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    alone = _fields("deepseek", {**deepseek, "max_completion_tokens": 1})
    assert alone.cost_usd is None and alone.reason is not None
    assert alone.reason.startswith("no output limit given")
    read = _fields("deepseek", {**deepseek, "max_completion_tokens": 1, "max_tokens": 8192})
    assert read.cost_usd is not None and read.output_tokens == 8192


def test_reasoning_beyond_the_limit_is_bounded_too() -> None:
    """DeepSeek-R1's chain of thought is not within max_tokens (up to 32K
    tokens more, billed as output): the bound adds it."""
    doc = {
        "model": "deepseek-reasoner",
        "messages": [{"role": "user", "content": "Prove it."}],
        "max_tokens": 1,
    }
    assert _fields("deepseek", doc).output_tokens == 1 + 32_768


def test_search_models_and_tools_of_every_provider_have_no_bound() -> None:
    """Perplexity's Sonar by any prefix (OpenRouter's perplexity/sonar),
    Groq's browser_search and xAI's x_search tools: the provider searches
    and adds what it finds to the input."""
    for model in ("perplexity/sonar", "sonar-pro", "perplexity/sonar-reasoning-pro"):
        assert _fields("openrouter", chat(model=model, max_tokens=1)).cost_usd is None, model
    for provider, kind in (("groq", "browser_search"), ("xai", "x_search")):
        doc = chat(model="gpt-4o-mini", max_tokens=1, tools=[{"type": kind}])
        assert bound(doc, provider=provider).reason == (
            "input a provider-run tool or a stored item brings cannot be bounded"
        ), kind


def test_input_is_priced_as_a_cache_write_where_one_is_dearer() -> None:
    """Any part of an Anthropic prompt may be marked for caching, and a
    cache write costs 1.25x the input: the bound prices every input token
    so (Claude Haiku 4.5: $1.00 the million input tokens, $1.25 written)."""
    doc = {"model": "claude-haiku-4-5", "max_tokens": 0, "messages": []}
    fields = _fields("anthropic", doc)
    assert fields.cost_usd == pytest.approx(fields.input_tokens * 1.25e-6)
    openai = _fields("openai", chat(max_tokens=0))
    assert openai.cost_usd == pytest.approx(openai.input_tokens * 0.15e-6)  # no cache write price


def test_rates_are_read_again_for_each_utc_day_the_clock_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prices may change at midnight: a call on another UTC day than the
    rates held (the next day, or the one before when the clock is set
    back) is priced with that day's, both ways; calls within a day read
    the price once."""
    days: list[int] = []

    class DayPricer:
        def price(self, *args: Any) -> Any:
            when = args[-1]
            day = int(when // 86400)
            days.append(day)
            million = args[3].get("input_tokens", 0) + args[3].get("output_tokens", 0)
            usd = million / 1_000_000 * (1.0 if day % 2 else 2.0)  # per token: 1e-6 or 2e-6
            return type("Price", (), {"cost_usd": usd})()

    monkeypatch.setattr("parsers._worstcase.PRICER", DayPricer())
    monkeypatch.setattr("parsers._worstcase._rates", {})  # none held yet
    monkeypatch.setattr("parsers._worstcase._rates_until", 0.0)
    raw = json.dumps(chat(max_tokens=10)).encode()
    midnight = (WHEN // 86400 + 1) * 86400  # an odd day starts
    per_token = []
    for when in (midnight - 1.0, midnight - 0.5, midnight, midnight + 1.0, midnight - 1.0):
        args = ("openai", "api.example.com", "/v1/chat/completions", raw, len(raw), when)
        fields = worst_case_fields(*args)
        assert fields == _worst_case_any(*args)
        assert fields[2] is not None and fields[3] is not None and fields[4] is not None
        per_token.append(round(fields[2] / (fields[3] + fields[4]) * 1e6, 6))
    assert per_token == [2.0, 2.0, 1.0, 1.0, 2.0]
    even, odd = int(midnight // 86400) - 1, int(midnight // 86400)
    # three prices read a day (input, both, cache write), once per visit to the day
    assert days == [even] * 3 + [odd] * 3 + [even] * 3
