"""Shared helpers for llmobserve's tests: real processes, fake upstreams, raw clients."""
