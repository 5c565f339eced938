"""Small pieces of English the messages share."""

from __future__ import annotations

__all__ = ["with_article"]


def with_article(word: str | None) -> str:
    """C{a read}, C{an ingest}, C{an admin}."""
    return f"an {word}" if (word or "")[:1] in ("a", "e", "i", "o", "u") else f"a {word}"
