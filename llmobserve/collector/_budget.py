"""One memory budget for the frames the collector's links have half received.

Each link may hold one incomplete frame of up to 16 MiB while the rest of it
arrives. Forty connections doing that at once held 640 MB until their
deadlines. L{PartialFrameBudget} counts the bytes every link holds for its
incomplete frame; a link whose bytes would take the total past the cap, or
which holds more than a few KiB before it has said C{hello}, is refused (its
connection is closed; a real proxy reconnects and resends).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_MAX_PARTIAL_BYTES",
    "DEFAULT_MAX_PRE_HELLO_BYTES",
    "PartialFrameBudget",
]

#: Bytes of incomplete frames held across all links (64 MiB: sixty-four
#: proxies each halfway through a 1 MiB batch, or four 16 MiB frames).
DEFAULT_MAX_PARTIAL_BYTES: Final = 64 * 1024 * 1024

#: Bytes one link may hold before its C{hello} (a hello is under 100 bytes).
DEFAULT_MAX_PRE_HELLO_BYTES: Final = 64 * 1024


class PartialFrameBudget:
    """Bytes held for incomplete frames, per link and in total, against caps.

    @param max_total: the cap over all links together.
    @param max_pre_hello: the cap for one link that has not said C{hello}.
    @ivar refusals: links refused since start-up.
    """

    def __init__(
        self,
        max_total: int = DEFAULT_MAX_PARTIAL_BYTES,
        max_pre_hello: int = DEFAULT_MAX_PRE_HELLO_BYTES,
    ) -> None:
        self.max_total = max_total
        self.max_pre_hello = max_pre_hello
        self._held: dict[object, int] = {}
        self._total = 0
        self.refusals = 0

    @property
    def held(self) -> int:
        """Bytes held for incomplete frames by every link together."""
        return self._total

    def hold(self, link: object, nbytes: int, greeted: bool) -> str | None:
        """Record that C{link} now holds C{nbytes}; say why not, if it may not.

        On refusal the link's bytes are released at once (its connection is
        to be closed) and the reason is returned; otherwise C{None}.

        @param greeted: whether the link has said C{hello}.
        """
        before = self._held.get(link, 0)
        total = self._total - before + nbytes
        if not greeted and nbytes > self.max_pre_hello:
            why = f"{nbytes} bytes before hello (at most {self.max_pre_hello})"
        elif nbytes > before and total > self.max_total:
            why = (
                f"incomplete frames of all links would hold {total} bytes "
                f"(at most {self.max_total})"
            )
        else:
            if nbytes:
                self._held[link] = nbytes
            else:
                self._held.pop(link, None)
            self._total = total
            return None
        self.release(link)
        self.refusals += 1
        return why

    def release(self, link: object) -> None:
        """Forget what C{link} held (its connection is gone)."""
        self._total -= self._held.pop(link, 0)
