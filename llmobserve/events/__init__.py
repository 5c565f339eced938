"""The event path behind the proxy: parse pool, event record, spool, delivery.

What other packages use is exported here. The link's frame codec (shared
with the collector) is light and imported at once; the pipeline
(L{make_event_sink} and its parts: Twisted, the parsers, the price data) is
imported on first use, so the collector and the CLI that need only the codec
do not load it (about 35 MiB and half a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmobserve.events._codec import (
    MAGIC,
    MAX_EVENT_DEPTH,
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    encode_frame,
    nested_deeper_than,
)
from llmobserve.events.fields import EVENT_FIELDS

if TYPE_CHECKING:
    from llmobserve.events.pipeline import (
        EventPipeline,
        make_event_sink,
        open_spool,
        parse_collector_url,
    )

__all__ = [
    "EVENT_FIELDS",
    "MAGIC",
    "MAX_EVENT_DEPTH",
    "MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "EventPipeline",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "make_event_sink",
    "nested_deeper_than",
    "open_spool",
    "parse_collector_url",
]

#: Names served on first use, and the module that defines each.
_LAZY = dict.fromkeys(
    ("EventPipeline", "make_event_sink", "open_spool", "parse_collector_url"),
    "llmobserve.events.pipeline",
)


def __getattr__(name: str) -> Any:
    """Import a lazily exported name from its module (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
