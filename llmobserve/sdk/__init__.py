"""The client side of llmobserve: context, HTTP-library hooks, auto-start, spans.

The public API is re-exported by L{llmobserve}; the modules here are private.
Nothing in this package imports Twisted.
"""
