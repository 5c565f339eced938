"""The most a request can cost, from its body alone, before it is sent.

Budgets reserve this bound before a call goes upstream (see
C{docs/BUDGETS.md}). It must really be an upper bound, so:

 - input tokens are bounded by the body's size in bytes (a token of text
   is at least one byte, and JSON only adds bytes) plus a fixed allowance
   per image part (L{IMAGE_PART_TOKENS}, above the largest any provider
   documents for one image), since an image named by a URL costs far more
   tokens than its bytes;
 - output tokens by C{max_tokens}, C{max_completion_tokens},
   C{max_output_tokens} or Gemini's C{generationConfig.maxOutputTokens}
   (times C{n} choices), else the model's maximum output
   (L{MAX_OUTPUT_TOKENS}, by name prefix);
 - a request whose bound cannot be found (no model, a body too big to
   read, audio parts, file or document parts (a PDF, a video by URI), a
   model with no known maximum output and no limit
   given, no price) has no bound: C{cost_usd} is None with the reason;
 - so has a request whose input the provider adds from what it holds or
   fetches: an earlier response or conversation (C{previous_response_id},
   C{conversation}, an C{item_reference}), a stored prompt (C{prompt} as
   an object), cached content (Gemini's C{cachedContent}), or a tool the
   provider runs itself (web search, file search, code execution, an MCP
   server, image generation; OpenAI's C{web_search_options}), whose
   results enter the model's input with no byte of them in the body.

Prices are the events' own (L{PRICER}), read once per model and day as
per-token rates: the rate of a million input tokens (the top tier of a
tiered price) and the extra of a million output tokens on top of them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NamedTuple

import msgspec

from ._plainbody import decode_plain
from .jsonbody import BodyError, loads
from .pricing import PRICER
from .registry import REGISTRY

#: a top-level field the request does not have
_UNSET: Final[Any] = msgspec.UNSET

__all__ = [
    "IMAGE_PART_TOKENS",
    "MAX_OUTPUT_TOKENS",
    "WorstCase",
    "worst_case",
    "worst_case_fields",
]

#: Tokens allowed per image part: OpenAI's high-detail tiles top out near
#: 1.5k, Anthropic's 1568 px images near 1.6k, Gemini's 258 per tile;
#: 10k is above every documented figure.
IMAGE_PART_TOKENS: Final = 10_000
#: Per-message and framing tokens a chat template adds beyond the text.
_FIXED_INPUT_TOKENS: Final = 1_000

#: The largest output a model may produce when the request sets no limit,
#: by model-name prefix (longest prefix wins). Models not named here need
#: the request to say how much output it allows.
MAX_OUTPUT_TOKENS: Final[dict[str, int]] = {
    "gpt-3.5": 4_096,
    "gpt-4": 8_192,
    "gpt-4-turbo": 4_096,
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
    "gpt-4.1": 32_768,
    "gpt-5": 128_000,
    "o1": 100_000,
    "o3": 100_000,
    "o4-mini": 100_000,
    "claude-3": 8_192,
    "claude-3-haiku": 4_096,
    "claude-sonnet-4": 64_000,
    "claude-opus-4": 32_000,
    "claude-haiku-4": 64_000,
    "gemini-1.5": 8_192,
    "gemini-2.0": 8_192,
    "gemini-2.5": 65_536,
}
_PREFIXES: Final = sorted(MAX_OUTPUT_TOKENS, key=len, reverse=True)
_GEMINI_MODEL: Final = re.compile(r"/models/([^/:]+)")
#: An image part, in any provider's request format.
_IMAGE_PART: Final = re.compile(
    rb'"(?:image_url|input_image|inline_data|inlineData|file_data|fileData)"'
    rb'|"type"\s*:\s*"image"'
)
#: An audio part, an earlier answer's audio by id, or audio asked for as
#: output (C{"audio": {"voice": ...}}, priced above text): their tokens
#: cannot be bounded by the body's bytes.
_AUDIO_PART: Final = re.compile(
    rb'"(?:input_audio|audio_url)"|"type"\s*:\s*"audio"|"audio"\s*:\s*\{'
)
#: A file or document part (a PDF by id, URL or inline; OpenAI's C{file}
#: and C{input_file}, Anthropic's C{document}): pages become text and
#: images, so no byte count bounds them either.
_FILE_PART: Final = re.compile(rb'"type"\s*:\s*"(?:file|input_file|document)"')
#: Gemini names a file by URI (C{file_data} / C{fileData}): an image of
#: that type is bounded like any image; a video, audio or PDF is not.
_FILE_URI: Final = re.compile(rb'"(?:file_data|fileData)"')
#: A tool the provider runs itself, or a stored item named by id, by its
#: type: the model reads what they bring, and the body holds none of it.
#: OpenAI's tool types (Responses), Anthropic's server tools (dated:
#: C{web_search_20250305}). Exact names: an earlier call's record passed
#: back as input (C{"web_search_call"}, C{"server_tool_use"}) is in the
#: body, bounded.
_SERVER_TOOL: Final = re.compile(
    rb'"type"\s*:\s*"(?:web_search(?:_preview)?|web_fetch|file_search|code_interpreter'
    rb"|code_execution|image_generation|mcp|tool_search_tool_[a-z0-9]+|item_reference"
    rb"|google_search|browser_search|x_search)"
    rb'(?:_[0-9]+)*"'
)
#: The top-level fields that bring input the body does not hold (see
#: L{_SERVER_TOOL}), when set: OpenAI's earlier response, conversation,
#: stored prompt (C{prompt} as an object; a string is the legacy
#: completions' own prompt) and web search, Gemini's cached content,
#: Anthropic's MCP servers (a list of any), Azure OpenAI's data sources,
#: xAI's live search, OpenRouter's plugins (web search, file parsing)
_SERVER_STATE: Final = (
    "previous_response_id",
    "conversation",
    "prompt",
    "web_search_options",
    "cachedContent",
    "cached_content",
    "mcp_servers",
    "data_sources",
    "search_parameters",
    "plugins",
)
#: Gemini's (and Vertex AI's) tools the provider runs, by key of an
#: element of the top-level C{tools}
_GEMINI_SERVER_TOOLS: Final = frozenset(
    {
        "googleSearch",
        "google_search",
        "googleSearchRetrieval",
        "google_search_retrieval",
        "codeExecution",
        "code_execution",
        "urlContext",
        "url_context",
        "googleMaps",
        "google_maps",
        "fileSearch",
        "file_search",
        "retrieval",
        "enterpriseWebSearch",
        "enterprise_web_search",
        "computerUse",
        "computer_use",
    }
)
#: Models that search the web on every call, by name: OpenAI's search
#: models, Perplexity's Sonar, OpenRouter's C{:online} variants, Groq's
#: Compound systems
_SEARCH_MODEL: Final = re.compile(r"search|(^|/)sonar|:online$|(^|/)compound", re.IGNORECASE)
#: Providers that read OpenAI's own output limits (C{max_completion_tokens},
#: Responses' C{max_output_tokens}) besides C{max_tokens}
_OPENAI_LIMITS: Final = frozenset({"openai", "azure_openai", "groq", "xai"})
#: Models whose reasoning is not within C{max_tokens} (DeepSeek-R1's
#: chain of thought: "up to 32K tokens" beyond the final answer's limit,
#: billed as output), by name; and the most it adds
_REASONING_BEYOND_LIMIT: Final = re.compile(r"deepseek-reasoner|deepseek-r1", re.IGNORECASE)
_REASONING_TOKENS: Final = 32_768
_SERVER_TOOL_REASON: Final = "input a provider-run tool or a stored item brings cannot be bounded"
#: Where any of the markers above may be: every one begins with a quote
#: and then one of these (grouped by first letter, so that at each quote
#: of the body one test of its next byte sends most keys and strings on).
#: A body it does not match has no part of any kind and no tool the
#: provider runs named by its type (a test checks that it matches wherever
#: one of the exact markers does). The full way runs them where it
#: matches, unless the body is of text only (L{_all_text}): then the
#: match is in a message's text.
_ANY_PART: Final = re.compile(
    rb'"(?:i(?:mage_url|nput_image|nline_data|nlineData|nput_audio)'
    rb"|f(?:ile_data|ileData)"
    rb'|a(?:udio_url|udio"\s*:\s*\{)'
    rb'|type"\s*:\s*"(?:image|audio|file|input_file|document|item_reference'
    rb"|web_|code_|mcp|tool_search|google_|browser_search|x_search))"
)
#: A printable ASCII character written as an escape (C{\u0069} for
#: C{i}): no JSON encoder writes one, but a key or value so written reads
#: the same to the provider, and the markers above would not see it. Such
#: a body (or one not in UTF-8) is searched as its plain UTF-8 rewrite
#: (L{_plain}).
_ESCAPED_ASCII: Final = re.compile(rb"\\u00[2-7]")
#: A body with no backslash has no escape: looked for as a byte first (a
#: C{memchr}, a seventh of the search above)
_BACKSLASH: Final = ord("\\")


class WorstCase(NamedTuple):
    """The bound: its cost in USD (None: no bound, C{reason} says why).

    The budget check takes the same fields as a plain tuple
    (L{worst_case_fields}).
    """

    provider: str | None
    model: str | None
    cost_usd: float | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    reason: str | None = None


#: Per-token rates (L{_rates_for}) by provider id, then model, for one
#: UTC day, from L{_rates_from} until L{_rates_until} (nested, as a lookup
#: by a tuple key costs three times as much: a tuple made and hashed for
#: every call). (USD per input token, USD per output token, output tokens
#: beyond the limit)
Rates = tuple[float, float, int]
_rates: dict[str, dict[str, Rates | None]] = {}
#: the unix times the UTC day of the rates in L{_rates} starts and ends
#: (L{_rates_for} sets them): two comparisons tell whether a call is on
#: that day, where a float's floor division ran C{fmod}, code nothing
#: else of a call runs
_rates_from = 0.0
_rates_until = 0.0
#: what L{_rates} gives for a model it does not hold (None is a cached "no price")
_UNKNOWN: Final = (-1.0, -1.0, 0)
#: the registry's providers by id, read without a method call per bound
_PROVIDERS: Final = {p.id: p for p in REGISTRY.providers}


class _Top(msgspec.Struct, gc=False):
    """The top-level fields of a request that bound its output.

    C{msgspec} decodes only these and skips the rest (the messages, the
    tools) without building a Python object for it, still checking that
    the whole body is well-formed JSON. Like C{json} and the providers'
    decoders, it unescapes key names, takes the last of a repeated key
    and reads integers of any size exactly (a limit past 64 bits is not
    read as a float).

    Not tracked by the garbage collector (C{gc=False}): JSON values hold
    no cycles, and one is made for every budgeted call.
    """

    model: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    cachedContent: Any = None
    cached_content: Any = None
    web_search_options: Any = None
    prompt: Any = None
    mcp_servers: Any = None
    data_sources: Any = None
    search_parameters: Any = None
    plugins: Any = None
    extra_body: Any = None
    tools: Any = None
    input: Any = None
    max_completion_tokens: Any = _UNSET
    max_output_tokens: Any = _UNSET
    max_tokens: Any = _UNSET
    n: Any = _UNSET
    generationConfig: Any = None  # Gemini's spelling
    generation_config: Any = None


_decode_top: Final = msgspec.json.Decoder(_Top).decode


_TOP_FIELDS: Final = _Top.__struct_fields__
_NOTHING: Final = _Top()


def _top_of(body: bytes) -> _Top | None:
    """The body's top-level fields when C{msgspec} refuses it (a BOM,
    UTF-16, NaN, a number out of its range: L{loads} decides); None: not JSON."""
    try:
        doc = loads(body)
    except BodyError:
        return None
    if type(doc) is not dict:
        return _NOTHING
    return _Top(**{k: doc[k] for k in _TOP_FIELDS if k in doc})


def worst_case(
    provider_id: str | None,
    host: str,
    path: str,
    body: bytes | None,
    body_bytes: int,
    when: float,
) -> WorstCase:
    """The most this request can cost. C{body} None: not read whole (too big).

    Total: never raises.
    """
    return WorstCase._make(worst_case_fields(provider_id, host, path, body, body_bytes, when))


#: L{WorstCase}'s fields as a plain tuple, in its order
Fields = tuple[str | None, str | None, float | None, int | None, int | None, str | None]


def _no_bound(
    provider: str | None,
    model: str | None,
    reason: str,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> Fields:
    return (provider, model, None, input_tokens, output_tokens, reason)


def worst_case_fields(
    provider_id: str | None,
    host: str,
    path: str,
    body: bytes | None,
    body_bytes: int,
    when: float,
) -> Fields:
    """L{worst_case}'s fields as a plain tuple, for the budget check.

    It runs on the reactor for every budgeted call, whose caller unpacks
    the tuple at once (a named tuple would cost a constructor call more).
    The common case is taken here in one pass: a known provider, a
    request of text only (L{decode_plain}: messages, function tools,
    nothing the provider adds) naming its model and an output limit, a
    price already read today. Anything else, and whatever this pass is
    not sure of, is L{_worst_case_any}'s, which gives the same figures for
    the common case (tests hold both to that).

    The one pass decodes the body against a schema of text requests where
    it used to search its bytes for part markers as well: the search cost
    more per byte than the decoder (docs/BENCHMARKS.md, session 13).
    """
    if provider_id and body:
        try:
            # the rates of the provider's models the full way read today
            # (none: not a provider it knows, or not yet today; never a
            # model the full way gives no bound before it reads a price,
            # as one that searches the web: the one pass need not test it)
            models = _rates.get(provider_id)
            if models is not None and _rates_from <= when < _rates_until:
                # raises for all but a request of text, its model a string
                # (or absent: ""), its limits whole numbers from 0 up
                top = decode_plain(body)
                limit: Any = top.max_tokens  # (an int once not _UNSET)
                if top.max_completion_tokens is not _UNSET or top.max_output_tokens is not _UNSET:
                    limit = _output_limit(top, provider_id)
                if limit is not _UNSET:  # (else the model's maximum: the full way's)
                    model = top.model
                    rates = models.get(model)  # (None for no model named: "")
                    if rates is not None:
                        input_tokens = body_bytes + _FIXED_INPUT_TOKENS
                        output_tokens = limit + rates[2]
                        cost = input_tokens * rates[0] + output_tokens * rates[1]
                        return (provider_id, model, cost, input_tokens, output_tokens, None)
        except Exception:  # not JSON, not an object, ...: the full way says why
            pass
    return _worst_case_any(provider_id, host, path, body, body_bytes, when)


def _worst_case_any(
    provider_id: str | None,
    host: str,
    path: str,
    body: bytes | None,
    body_bytes: int,
    when: float,
) -> Fields:
    """L{worst_case_fields} for any request: every provider, format and part."""
    try:
        provider = _PROVIDERS.get(provider_id) if provider_id else REGISTRY.for_host(host)
        pid = provider.id if provider is not None else provider_id
        if body is None:
            return _no_bound(pid, None, "request body too large to bound")
        top = _NOTHING
        scan = body  # what the part markers are searched in
        if body:
            try:
                top = _decode_top(body)
            except msgspec.ValidationError:  # well-formed, but not an object
                pass
            except msgspec.DecodeError:
                read = _top_of(body)
                if read is None:
                    return _no_bound(pid, None, "request body is not JSON")
                top = read
                scan = b""  # UTF-16 or 32, a BOM, NaN ...: searched as rewritten
            if not scan or (_BACKSLASH in body and _ESCAPED_ASCII.search(body) is not None):
                plain = _plain(body)
                if plain is None:  # escapes in a body the stdlib cannot read
                    return _no_bound(pid, None, "request body cannot be read as JSON text")
                # both as written and as read: a provider that takes the
                # first of a repeated key reads what the rewrite dropped
                scan = body + b"\n" + plain
        model = top.model
        if type(model) is not str:
            m = _GEMINI_MODEL.search(path)
            model = m.group(1) if m else None
        if provider is None or pid is None:
            return _no_bound(pid, model, "unknown provider")
        if model is None:
            return _no_bound(pid, None, "no model named")
        held = _server_state(top)
        if held is not None:
            return _no_bound(pid, model, f"input the provider adds ({held}) cannot be bounded")
        if _SEARCH_MODEL.search(model) is not None:
            return _no_bound(pid, model, f"{model} searches the web: its input cannot be bounded")
        if _input_held(top.input):
            return _no_bound(pid, model, _SERVER_TOOL_REASON)
        input_tokens = body_bytes + _FIXED_INPUT_TOKENS
        # The exact markers run only on a body where _ANY_PART finds one of
        # them (or something like one): one pass, that skips from one quote
        # to the next, where five substring searches read every byte five
        # times (and the words "data" or "image" in a prompt set them off)
        if scan and _ANY_PART.search(scan) is not None and not _all_text(body):
            if _AUDIO_PART.search(scan) is not None:
                return _no_bound(pid, model, "audio parts cannot be bounded")
            if _FILE_URI.search(scan) is not None and not _file_uris_are_images(body):
                return _no_bound(pid, model, "file parts cannot be bounded")
            if _FILE_PART.search(scan) is not None:
                return _no_bound(pid, model, "file parts cannot be bounded")
            if _SERVER_TOOL.search(scan) is not None:
                return _no_bound(pid, model, _SERVER_TOOL_REASON)
            input_tokens += len(_IMAGE_PART.findall(scan)) * IMAGE_PART_TOKENS
        # the output limit (L{_output_limit}), times n (anything but a
        # whole number and one choice: _output_bound)
        limit = _output_limit(top, pid)
        if limit is _UNSET and _gemini_server_tool(top.tools):
            # (a body with a top-level limit is not Gemini's: its API
            # refuses a field it does not know, such a call costs nothing)
            return _no_bound(pid, model, _SERVER_TOOL_REASON)
        output_tokens: int | None = limit
        if type(limit) is not int or limit < 0 or top.n is not _UNSET:
            output_tokens = _output_bound(top, limit, model)
        if output_tokens is None:
            return _no_bound(
                pid, model, f"no output limit given and none known for {model}", input_tokens
            )
        rates = _rates_for(pid, model, provider.prices_id, when)
        if rates is None:
            return _no_bound(pid, model, "no price", input_tokens, output_tokens)
        output_tokens += rates[2]
        cost = input_tokens * rates[0] + output_tokens * rates[1]
        return (pid, model, cost, input_tokens, output_tokens, None)
    except Exception as e:  # a bound we cannot find is no bound
        return _no_bound(provider_id, None, f"internal error: {type(e).__name__}")


def _server_state(top: _Top) -> str | None:
    """The first top-level field of L{_SERVER_STATE} the request sets, if
    any (or Gemini's cached content in OpenAI-compatible C{extra_body})."""
    for name in _SERVER_STATE:
        value = getattr(top, name)
        if value is None or value == [] or (name == "prompt" and type(value) is not dict):
            continue
        return name
    extra = top.extra_body
    if isinstance(extra, dict):
        google = extra.get("google")
        if isinstance(google, dict) and google.get("cached_content") is not None:
            return "extra_body.google.cached_content"
    return None


def _gemini_server_tool(tools: Any) -> bool:
    """Whether an element of the top-level C{tools} names a tool Gemini runs."""
    return isinstance(tools, list) and any(
        isinstance(tool, dict) and not _GEMINI_SERVER_TOOLS.isdisjoint(tool) for tool in tools
    )


def _input_held(items: Any) -> bool:
    """Whether Responses' C{input} names an item the provider holds: an
    C{item_reference} (its C{type} may be left out: an item with an C{id}
    and nothing else of a message), or a reasoning item by id whose
    content is not in the body (no C{encrypted_content})."""
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            continue
        kind = item.get("type")
        if kind == "item_reference" or (kind is None and "content" not in item):
            return True
        if kind == "reasoning" and not item.get("encrypted_content"):
            return True
    return False


def _output_bound(top: _Top, limit: Any, model: str) -> int | None:
    """The output limit the request gives (C{limit}: the first it has of
    the three top-level ones, else _UNSET) or its model's maximum, times C{n}."""
    if limit is _UNSET:
        config = top.generationConfig or top.generation_config
        limit = None
        if isinstance(config, dict):
            limit = config.get("maxOutputTokens", config.get("max_output_tokens"))
    choices = top.n
    if type(choices) is not int or choices < 1:  # (a bool is not an int here)
        choices = 1
    if type(limit) is int and limit >= 0:
        return limit * choices
    name = model.rsplit("/", 1)[-1]
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return MAX_OUTPUT_TOKENS[prefix] * choices
    return None


def _rates_for(provider_id: str, model: str, prices_id: str | None, when: float) -> Rates | None:
    """(USD per input token, USD per output token, output tokens beyond
    the limit) of the provider's model on the UTC day of C{when}, read
    once per day (L{_rates}).

    An input token is priced at the dearer of the plain input and a cache
    write (Anthropic's 1.25x: any part of the prompt may be marked for
    caching), and a model that reasons beyond its limit
    (L{_REASONING_BEYOND_LIMIT}) adds its reasoning's most.
    """
    global _rates_from, _rates_until
    if not _rates_from <= when < _rates_until:  # a new day: prices may have changed
        _rates.clear()
        _rates_from = when // 86400 * 86400
        _rates_until = _rates_from + 86400
    models = _rates.setdefault(provider_id, {})
    cached = models.get(model, _UNKNOWN)
    if cached is not _UNKNOWN:
        return cached
    million = 1_000_000

    def price(**usage: int) -> float | None:
        return PRICER.price(provider_id, prices_id, model, usage, when).cost_usd

    inp = price(input_tokens=million)
    both = price(input_tokens=million, output_tokens=million)
    rates: Rates | None = None
    if inp is not None and both is not None:
        # (a cache write's tokens are among the input tokens, priced above them)
        written = price(input_tokens=million, cache_write_tokens=million)
        beyond = _REASONING_TOKENS if _REASONING_BEYOND_LIMIT.search(model) else 0
        rates = (
            max(inp, written or 0.0) / million,
            max(both - inp, 0.0) / million,
            beyond,
        )
    if len(models) >= 4096:  # models come from requests: stay bounded
        models.clear()
    models[model] = rates
    return rates


def _output_limit(top: Any, provider_id: str | None) -> Any:
    """The request's output limit: the largest of the top-level limits the
    provider reads (C{max_completion_tokens} and C{max_output_tokens} are
    OpenAI's own, read by L{_OPENAI_LIMITS}; the rest read C{max_tokens}
    alone and ignore them: DeepSeek's API, given C{max_completion_tokens}
    only, runs to its default), C{_UNSET} when none is given, None when
    one is not a whole number (the model's maximum then)."""
    given = [top.max_tokens]
    if provider_id in _OPENAI_LIMITS:
        given += (top.max_completion_tokens, top.max_output_tokens)
    given = [v for v in given if v is not _UNSET]
    if not given:
        return _UNSET
    if all(type(v) is int and v >= 0 for v in given):
        return max(given)
    return None


def _plain(body: bytes) -> bytes | None:
    """The JSON body written again in UTF-8 with no escape but those JSON
    needs (a quote, a backslash, a control character): what the provider
    reads, in the bytes the part markers look for (None: not readable)."""
    try:
        doc = loads(body)
    except BodyError:
        return None
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _all_text(body: bytes) -> bool:
    """Whether the body is a request of text only (L{decode_plain}): a
    part marker found in it is in a message's text, not a part."""
    try:
        decode_plain(body)
    except Exception:  # not one (or not JSON in UTF-8, nested too deep, ...)
        return False
    return True


def _file_uris_are_images(body: bytes) -> bool:
    """Whether every Gemini file by URI (C{fileData} / C{file_data}) names
    an image's MIME type in its own object (one with no MIME type, such as
    a video by URL, is not known to be an image)."""
    try:
        doc = loads(body)
    except BodyError:
        return False
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("fileData", "file_data"):
                if key in node:
                    data = node[key]
                    mime = (
                        data.get("mimeType", data.get("mime_type"))
                        if isinstance(data, dict)
                        else None
                    )
                    if not (isinstance(mime, str) and mime.startswith("image/")):
                        return False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return True
