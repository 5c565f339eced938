"""twistd plugins: C{twistd llmobserve} and C{twistd llmobserve-collector}."""

from twisted.application.service import ServiceMaker

llmobserve = ServiceMaker(
    "llmobserve",
    "llmobserve.proxy._tap",
    "Streaming forwarding proxy that tracks the cost of every paid API call.",
    "llmobserve",
)

llmobserveCollector = ServiceMaker(
    "llmobserve-collector",
    "llmobserve.collector._tap",
    "Collector for llmobserve events: msgpack link and HTTP API on one port.",
    "llmobserve-collector",
)
