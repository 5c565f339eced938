"""Several collectors behind one link: their endpoints tried in turn.

C{--collector} is repeatable: collectors that share one PostgreSQL store
are interchangeable, so the link connects to the first, and after a failed
attempt the next attempt goes to the next one (round robin). A link that
was up and is lost retries the same collector first: its next failure
moves on. Exactly-once holds whichever collector stores a batch, because
the event id is the store's key.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["RotatingEndpoint"]


@implementer(IStreamClientEndpoint)
class RotatingEndpoint:
    """Connects to C{endpoints[i]}; a failed attempt moves C{i} to the next one.

    @ivar current: the index the next attempt uses.
    @ivar urls: the collector URL of each endpoint, in the same order (empty
        when not given).
    """

    def __init__(
        self, endpoints: Sequence[IStreamClientEndpoint], urls: Sequence[str] = ()
    ) -> None:
        if not endpoints:
            raise ValueError("no collector endpoint")
        if urls and len(urls) != len(endpoints):
            raise ValueError("one URL per collector endpoint")
        self._endpoints = list(endpoints)
        self.urls = list(urls)
        self.current = 0

    @property
    def current_url(self) -> str | None:
        """The URL of the collector the next attempt goes to (the one in
        use while the link is up); None when no URLs were given."""
        return self.urls[self.current] if self.urls else None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        index = self.current
        d = self._endpoints[index].connect(protocolFactory)

        def failed(failure: Failure) -> Failure:
            if self.current == index:
                self.current = (index + 1) % len(self._endpoints)
            return failure

        d.addErrback(failed)
        return d
