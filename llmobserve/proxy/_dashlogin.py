"""The embedded proxy's dashboard login, when it requires keys.

The collector's login (L{llmobserve.collector.DashboardGate}) over this
proxy's client-key check (L{ClientKeyGate}: its store file, or its
collector's C{/api/whoami}) instead of the collector's own verifier. Its
sessions (L{llmobserve.collector.DashboardSessions}) also stand for a key
on the proxy's C{GET /api/*} (L{EmbeddedDashboardLogin.session_key}).
The collector package is imported on first use, as for the C{/api}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from llmobserve.proxy._keygate import ClientKeyGate, ClientVerdict

__all__ = ["EmbeddedDashboardLogin"]


class _ClientKeyVerdicts:
    """A L{ClientKeyGate} answering as the collector's verifier does."""

    def __init__(self, gate: ClientKeyGate) -> None:
        self._gate = gate

    def cached(self, key: str | None) -> Any:
        verdict = self._gate.cached(key.encode("utf-8") if key else None)
        return None if verdict is None else _as_verdict(verdict)

    def check(self, key: str | None) -> Deferred[Any]:
        if not key:
            return succeed(_as_verdict(ClientVerdict("missing")))
        d = self._gate.check(key.encode("utf-8"))
        return d.addCallback(_as_verdict)


def _as_verdict(verdict: ClientVerdict) -> Any:
    from llmobserve.collector import Verdict

    return Verdict(verdict.reason, None, verdict.project, verdict.scope)


class EmbeddedDashboardLogin:
    """The login page, sessions and guarded C{/dashboard} of an embedded
    proxy that requires keys.

    @param clock: the reactor, for the sessions' expiry.
    @param gate: this proxy's client-key check.
    """

    def __init__(self, clock: Any, gate: ClientKeyGate) -> None:
        from llmobserve.collector import DashboardSessions

        self._gate = gate
        self.sessions = DashboardSessions(clock)
        self._resource: Any = None

    def resource(self) -> Any:
        """The C{/dashboard} resource: the page behind its login."""
        if self._resource is None:
            from llmobserve.collector import DashboardGate, DashboardResource

            page = DashboardResource(with_logout=True)
            self._resource = DashboardGate(page, _ClientKeyVerdicts(self._gate), self.sessions)
        return self._resource

    def session_key(self, request: Any) -> bytes | None:
        """The key behind the request's session cookie, or None."""
        key = self.sessions.key_of(request)
        return None if key is None else key.encode("utf-8")
