"""The requests whose every part is text, told apart in one C{msgspec} pass.

A budgeted call's bound (L{parsers._worstcase}) is its body's bytes plus
the output limit for most calls: chat and Messages requests of text, with
function tools and their calls. Anything else (an image, audio or file
part, a tool the provider runs, input it holds by id, C{n} choices, a
field it does not know) may cost more than its bytes say, and is the full
way's to read.

L{decode_plain} decodes a body into the schema of that common case, with
every object's fields named and typed and every other field refused
(C{forbid_unknown_fields}), so that a body it accepts has no part, tool or
field of any other kind: a C{ValidationError} sends the rest the full way.
It reads the body as the providers do (key escapes decoded, a repeated key
checked each time), and the text of a message is text to it, where a
search of the raw bytes for part markers also finds them in a prompt that
quotes one. A function tool's JSON schema, and a tool call's input, are
skipped (C{msgspec.Raw}): they are text in the model's input, counted by
their bytes, and name no part.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = ["PlainBody", "decode_plain"]

_UNSET: Final[Any] = msgspec.UNSET
#: an output limit: a whole number from 0 up (of any size)
_Limit = Annotated[int, msgspec.Meta(ge=0)]
#: a JSON value skipped, not there
_NO_RAW: Final = msgspec.Raw()


class _Strict(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An object with these fields and no other (not tracked by the
    garbage collector: JSON values hold no cycles)."""


class _CacheControl(_Strict):
    type: str
    ttl: str | None = None


class _Text(_Strict, tag_field="type", tag="text"):
    """A text part (OpenAI's chat, Anthropic's Messages)."""

    text: str
    cache_control: _CacheControl | None = None


class _InputText(_Text, tag="input_text"):
    """A text part of Responses' input."""


class _ToolUse(_Strict, tag_field="type", tag="tool_use"):
    """Anthropic: a call of a function tool the assistant made, passed back."""

    id: str
    name: str
    input: msgspec.Raw
    cache_control: _CacheControl | None = None


class _ToolResult(_Strict, tag_field="type", tag="tool_result"):
    """Anthropic: a function tool's result, in text."""

    tool_use_id: str
    content: str | list[_Text] | None = None
    is_error: bool | None = None
    cache_control: _CacheControl | None = None


class _Function(_Strict):
    name: str
    arguments: str | None = None  # a call's (OpenAI's chat)
    description: str | None = None  # a tool's
    parameters: msgspec.Raw = _NO_RAW
    strict: bool | None = None


class _ToolCall(_Strict):
    """OpenAI's chat: a call of a function tool the assistant made, passed back."""

    id: str
    type: Literal["function"]
    function: _Function


class _Message(_Strict):
    """A chat or Messages message (or Responses' input message) of text."""

    role: str
    content: str | list[_Text | _InputText | _ToolUse | _ToolResult] | None = None
    type: Literal["message"] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _Tool(_Strict):
    """A function tool: OpenAI's chat (C{function}), Responses' and
    Anthropic's (C{name}, with C{parameters} or C{input_schema}); the
    type of a tool the provider runs is refused."""

    type: Literal["function", "custom"] | None = None
    function: _Function | None = None
    name: str | None = None
    description: str | None = None
    parameters: msgspec.Raw = _NO_RAW
    input_schema: msgspec.Raw = _NO_RAW
    strict: bool | None = None
    cache_control: _CacheControl | None = None


class _ToolChoice(_Strict):
    type: Literal["auto", "any", "none", "tool", "function", "required"]
    function: _Function | None = None
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


class _Thinking(_Strict):
    """Anthropic's extended thinking (its tokens are within C{max_tokens})."""

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = None


class _Reasoning(_Strict):
    """Responses' reasoning (its tokens are within C{max_output_tokens})."""

    effort: str | None = None
    summary: str | None = None


class PlainBody(_Strict):
    """A request of text only, every field typed: its model a string
    (C{""} when not named), its output limits whole numbers of any size
    from 0 up, or unset (any other value is the full way's to read).

    The fields are in the order the OpenAI SDK writes them (the model,
    C{stream} and the messages first, then by name): the decoder looks a
    key up from the field after the last one it found, so each key of
    such a body is the first field it reads (and of the Anthropic SDK's,
    by name, all but three).
    """

    model: str = ""
    stream: bool | None = None
    messages: list[_Message] | None = None
    frequency_penalty: float | None = None
    input: str | list[_Message] | None = None  # Responses
    instructions: str | None = None  # Responses
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: _Limit | msgspec.UnsetType = _UNSET
    max_output_tokens: _Limit | msgspec.UnsetType = _UNSET
    max_tokens: _Limit | msgspec.UnsetType = _UNSET
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = None
    prompt_cache_key: str | None = None
    reasoning: _Reasoning | None = None
    reasoning_effort: str | None = None
    response_format: _ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: int | None = None
    #: C{priority} is priced above the standard rates: the full way's
    service_tier: Literal["auto", "default", "flex"] | None = None
    stop: str | list[str] | None = None
    stop_sequences: list[str] | None = None
    store: bool | None = None
    stream_options: _StreamOptions | None = None
    system: str | list[_Text] | None = None  # Anthropic
    temperature: float | None = None
    thinking: _Thinking | None = None
    tool_choice: Literal["auto", "none", "required"] | _ToolChoice | None = None
    tools: list[_Tool] | None = None
    top_k: int | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None


#: The body as a L{PlainBody}; raises C{msgspec.ValidationError} for a
#: body with anything else, C{msgspec.DecodeError} for one that is not
#: JSON in UTF-8.
decode_plain: Final = msgspec.json.Decoder(PlainBody).decode
