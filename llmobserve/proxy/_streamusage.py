"""C{--stream-usage}: ask OpenAI-style streams for their usage, hide the answer.

L{StreamUsagePolicy} decides once per request, at header time, from the
method, the path and the provider, whether the relay rewrites it; only
then does the relay get a L{UsageInjection}, its one hook for this
feature (every other request costs a method comparison and, for POSTs, a
path suffix test). The injection holds the request body (bounded: at most
C{body_bound} bytes, announced by C{Content-Length} or counted as a
chunked body arrives), adds C{stream_options.include_usage} to it, and
gives the relay a L{UsageChunkFilter} for the response, which removes the
usage event the client did not ask for.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from llmobserve.proxy._headers import RequestHead
from llmobserve.proxy._policy import _canonical_host_port
from parsers.registry import REGISTRY
from parsers.streamusage import (
    STREAM_USAGE_MODES,
    UsageChunkFilter,
    inject_include_usage,
    usage_injectable_path,
)

__all__ = ["DEFAULT_BODY_BOUND", "StreamUsagePolicy", "UsageInjection"]

#: Request bodies up to this size are read whole to be rewritten; larger
#: ones are forwarded unchanged and their usage estimated.
DEFAULT_BODY_BOUND = 1024 * 1024
_DEFAULT_MODES: Mapping[str, str] = {"openai": "inject"}
_IDENTITY = (b"Accept-Encoding", b"identity")


class StreamUsagePolicy:
    """The C{--stream-usage} modes, and which requests they rewrite.

    @param modes: provider id -> C{inject}, C{estimate} or C{off}; a
        provider not named gets the default (C{openai=inject}, C{estimate}
        for the rest).
    @param provider_hosts: C{--provider-host} C{HOST[:PORT]} -> provider id,
        so a host declared C{=openai} is injected like the real one.
    """

    __slots__ = ("_hosts", "_injected", "_modes", "body_bound")

    def __init__(
        self,
        modes: Mapping[str, str] | None = None,
        provider_hosts: Mapping[str, str] | None = None,
        body_bound: int = DEFAULT_BODY_BOUND,
    ) -> None:
        merged = {**_DEFAULT_MODES, **(modes or {})}
        for provider, mode in merged.items():
            if mode not in STREAM_USAGE_MODES:
                raise ValueError(
                    f"--stream-usage {provider}={mode}: not one of inject|estimate|off"
                )
        self._modes = merged
        self._hosts = {
            _canonical_host_port(spec): provider
            for spec, provider in (provider_hosts or {}).items()
        }
        self.body_bound = body_bound
        #: (host, port, hint) -> inject or not; bounded (hosts come from clients)
        self._injected: dict[tuple[str, int, str | None], bool] = {}

    def mode_for(self, provider: str | None) -> str:
        """The mode for one provider id."""
        return self._modes.get(provider or "", "estimate")

    @property
    def no_estimate(self) -> frozenset[str]:
        """Provider ids set to C{off}: their streams without usage stay unpriced."""
        return frozenset(p for p, mode in self._modes.items() if mode == "off")

    def plan(
        self, method: bytes, path: str, host: str, port: int, hint: str | None, head: RequestHead
    ) -> UsageInjection | None:
        """A L{UsageInjection} for a request this policy rewrites, else None."""
        if method != b"POST" or not usage_injectable_path(path):
            return None
        key = (host, port, hint)
        injected = self._injected.get(key)
        if injected is None:
            injected = self.mode_for(self._provider(host, port, hint)) == "inject"
            if len(self._injected) >= 1024:
                self._injected.clear()
            self._injected[key] = injected
        if not injected:
            return None
        length = head.content_length
        if not head.chunked and (length is None or not 0 < length <= self.body_bound):
            return None  # a chunked body is counted against the bound as it arrives
        for name, _ in head.forward:  # a loop, not any(): no generator per request
            if name.lower() == b"content-encoding":
                return None  # a compressed request body is forwarded as it is
        return UsageInjection(self.body_bound)

    def _provider(self, host: str, port: int, hint: str | None) -> str | None:
        if hint is not None:
            return hint
        if self._hosts:  # the target's host is canonical already
            found = self._hosts.get((host, port)) or self._hosts.get((host, None))
            if found is not None:
                return found
        provider = REGISTRY.for_host(host)
        return provider.id if provider is not None else None


class _State(enum.Enum):
    HOLDING = "holding"  # reading the request body, nothing sent upstream yet
    INJECTED = "injected"  # the body was rewritten: filter the response
    UNCHANGED = "unchanged"  # over the bound, or nothing to rewrite


class UsageInjection:
    """One request's rewrite: hold its body, then send it with usage asked for."""

    __slots__ = ("_bound", "_parts", "_size", "content_length", "holding", "state")

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._parts: list[bytes] = []
        self._size = 0
        self.state = _State.HOLDING
        #: The body is still being read: nothing may go upstream yet (the
        #: relay asks three times per request: a field, not a property).
        self.holding = True
        #: The rewritten body's length, for the request head (None: unchanged).
        self.content_length: int | None = None

    def hold(self, data: bytes) -> bytes | None:
        """Keep C{data}; None while holding, or every byte so far once the
        body passes the bound (then it is forwarded unchanged)."""
        self._parts.append(data)
        self._size += len(data)
        if self._size <= self._bound:
            return None
        self.state = _State.UNCHANGED
        self.holding = False
        body = b"".join(self._parts)
        self._parts = []
        return body

    def finish(self) -> bytes:
        """The whole body arrived: the bytes to send upstream."""
        body = b"".join(self._parts)
        self._parts = []
        self.holding = False
        rewritten = inject_include_usage(body)
        if rewritten is None:
            self.state = _State.UNCHANGED
            return body
        self.state = _State.INJECTED
        self.content_length = len(rewritten)
        return rewritten

    def forward_headers(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers for upstream: an injected request asks for
        an uncompressed answer, so that its usage event can be taken out."""
        if self.state is not _State.INJECTED:
            return pairs
        return [p for p in pairs if p[0].lower() != b"accept-encoding"] + [_IDENTITY]

    def response_filter(
        self, status: int, headers: list[tuple[bytes, bytes]]
    ) -> UsageChunkFilter | None:
        """The filter for an injected request's successful event stream, else None."""
        if self.state is not _State.INJECTED or status != 200:
            return None
        stream = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-type":
                stream = value.lower().startswith(b"text/event-stream")
            elif lower == b"content-encoding" and value.strip().lower() != b"identity":
                return None
        return UsageChunkFilter() if stream else None
