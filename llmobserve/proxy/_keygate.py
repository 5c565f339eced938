"""The proxy's client keys: C{X-LLMObserve-Key} on every forwarded call.

A proxy listening beyond loopback (or run with C{--require-keys}) forwards
a call only when its C{X-LLMObserve-Key} is a valid key of scope C{ingest}
or C{admin}; the key's project goes into the call's event (C{project}).
The header is consumed like every C{X-LLMObserve-*} field: never forwarded.

Where keys are checked:
 - embedded mode: in the proxy's own store file (a thread of its own opens
   it on the first check; keys are made there with C{llmobserve keys create
   --db}, the same file);
 - collector mode: by the collector, C{GET /api/whoami} with the key as
   C{Authorization: Bearer} (one HTTP request in a thread, 5 s timeout).

L{ClientKeyGate} remembers each verdict for L{VERDICT_TTL} seconds, so the
hot path is one dict lookup; a call whose key has no fresh verdict waits
for the check, its body held by L{AwaitingKey} (the client is paused past
64 KiB). When the check fails (collector unreachable) a key that was valid
before stays valid; an unknown one gets 503 C{key_check_unavailable}.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmobserve._words import with_article
from llmobserve.proxy._streaming import pause_client, resume_client

__all__ = [
    "VERDICT_TTL",
    "AwaitingKey",
    "ClientKeyGate",
    "ClientVerdict",
    "collector_lookup",
    "store_lookup",
]

VERDICT_TTL: Final = 2.0
_MAX_CACHED: Final = 4096
_HOLD_BYTES: Final = 64 * 1024

_log = Logger()

_MESSAGES: Final = {
    "missing": "X-LLMObserve-Key is required by this proxy",
    "unknown": "the X-LLMObserve-Key is not known",
    "revoked": "the X-LLMObserve-Key was revoked",
}


@attrs.frozen
class ClientVerdict:
    """What a client's key may do: C{reason} None for a valid key."""

    reason: str | None
    project: str | None = None
    scope: str | None = None

    def allows(self, scope: str) -> bool:
        """A valid key whose scope is C{scope} or C{admin}."""
        return self.reason is None and self.scope in (scope, "admin")

    def message(self, scope: str) -> str:
        """Why it does not allow C{scope} (never the key)."""
        if self.reason is None:
            return f"{with_article(self.scope)} key may not do this (needs {scope} or admin)"
        return _MESSAGES.get(self.reason, "the key was not accepted")


_MISSING: Final = ClientVerdict("missing")
_UNAVAILABLE: Final = ClientVerdict("unavailable")

Lookup = Callable[[str], Deferred[ClientVerdict]]


class ClientKeyGate:
    """Cached verdicts on clients' keys.

    @param clock: for expiry.
    @param lookup: asks the key store (a Deferred of a L{ClientVerdict};
        it fails when the store cannot be asked).
    """

    def __init__(self, clock: IReactorTime, lookup: Lookup, ttl: float = VERDICT_TTL) -> None:
        self._clock = clock
        self._lookup = lookup
        self._ttl = ttl
        self._cache: dict[bytes, tuple[float, ClientVerdict]] = {}
        #: look-ups made (cache misses), for tests
        self.lookups = 0

    def cached(self, key: bytes | None) -> ClientVerdict | None:
        """The fresh verdict on C{key}, or None when it must be checked."""
        if not key:
            return _MISSING
        entry = self._cache.get(key)
        if entry is None or entry[0] <= self._clock.seconds():
            return None
        return entry[1]

    def check(self, key: bytes | None) -> Deferred[ClientVerdict]:
        """The verdict on C{key}: at once when fresh, else from the store."""
        verdict = self.cached(key)
        if verdict is not None:
            return succeed(verdict)
        assert key is not None
        self.lookups += 1
        try:
            text = key.decode("ascii")
        except UnicodeDecodeError:
            return succeed(ClientVerdict("unknown"))
        d = self._lookup(text)
        d.addCallbacks(self._remember, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return d

    def _remember(self, verdict: ClientVerdict, key: bytes) -> ClientVerdict:
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (self._clock.seconds() + self._ttl, verdict)
        return verdict

    def _failed(self, failure: Failure, key: bytes) -> ClientVerdict:
        _log.warn("client key check failed: {why}", why=failure.getErrorMessage())
        stale = self._cache.get(key)
        if stale is not None and stale[1].reason is None:
            return stale[1]
        return _UNAVAILABLE


def _store_verdict(reason: str | None, project: str | None, scope: str | None) -> ClientVerdict:
    if reason is not None:
        return ClientVerdict(reason)
    return ClientVerdict(None, project, scope)


class store_lookup(Service):  # used as a function: store_lookup(path)(key)
    """Checks keys in the embedded store file, in a thread of its own
    (opened on the first check, stopped with the proxy)."""

    def __init__(self, reactor: Any, db_path: str) -> None:
        self._reactor = reactor
        self._db_path = db_path
        self._thread: Any = None

    def __call__(self, key: str) -> Deferred[ClientVerdict]:
        if self._thread is None:
            from llmobserve.collector import EventStore, StoreThread

            path = self._db_path
            self._thread = StoreThread(
                self._reactor, lambda: EventStore(path, synchronous="NORMAL"), "llmobserve-keys"
            )
            self._thread.startService()

        def verify(store: Any) -> ClientVerdict:
            v = store.keys.verify(key)
            return _store_verdict(v.reason, v.project, v.scope)

        d: Deferred[ClientVerdict] = self._thread.submit(verify)
        return d

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
        thread, self._thread = self._thread, None
        if thread is not None:
            stopped: Deferred[None] = thread.stopService()
            return stopped
        return None


def collector_lookup(collector_url: str, ca_file: str | None = None) -> Lookup:
    """Checks keys with the collector's C{GET /api/whoami}, in a thread."""
    base = collector_url.rstrip("/")
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)

    def ask(key: str) -> ClientVerdict:
        request = urllib.request.Request(
            base + "/api/whoami", headers={"Authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0, context=context) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 401:
                try:
                    reason = json.loads(e.read())["error"]["reason"]
                except Exception:
                    reason = "unknown"
                return ClientVerdict(reason if isinstance(reason, str) else "unknown")
            # no key in what is raised: the message is the status line
            raise RuntimeError(f"collector answered {e.code} to a key check") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(f"collector unreachable for a key check: {e}") from None
        return _store_verdict(None, body.get("project"), body.get("scope"))

    def lookup(key: str) -> Deferred[ClientVerdict]:
        d: Deferred[ClientVerdict] = deferToThread(ask, key)
        return d

    return lookup


class AwaitingKey:
    """A call's body receiver while its key is being checked.

    Holds the body (pausing the client past 64 KiB), then either starts the
    relay made by C{start(project)} and hands it everything held, or calls
    C{refuse(verdict)}; from then on it passes the body on (or drops it).
    """

    __slots__ = (
        "_complete",
        "_gone",
        "_held",
        "_paused",
        "_refuse",
        "_relay",
        "_request",
        "_size",
        "_start",
    )

    def __init__(
        self,
        request: Any,
        start: Callable[[str | None], Any],
        refuse: Callable[[ClientVerdict], None],
    ) -> None:
        self._request = request
        self._start = start
        self._refuse = refuse
        self._relay: Any = None
        self._held: list[bytes] | None = []
        self._size = 0
        self._complete = False
        self._gone = False
        self._paused = False

    def decided(self, verdict: ClientVerdict) -> None:
        """The key's verdict arrived: forward, or refuse."""
        held, self._held = self._held, None
        if self._gone or held is None:
            return
        if not verdict.allows("ingest"):
            self._refuse(verdict)
            return
        relay = self._relay = self._start(verdict.project)
        if relay is None:
            return
        for chunk in held:
            relay.body_chunk(chunk)
        if self._complete:
            relay.body_complete()
        if self._paused:
            self._paused = False
            resume_client(self._request)

    def body_chunk(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.body_chunk(data)
            return
        if self._held is None:
            return  # refused: the rest of the body is dropped
        self._held.append(data)
        self._size += len(data)
        if self._size > _HOLD_BYTES and not self._paused:
            self._paused = True
            pause_client(self._request)

    def body_complete(self) -> None:
        if self._relay is not None:
            self._relay.body_complete()
        else:
            self._complete = True

    def client_gone(self) -> None:
        if self._relay is not None:
            self._relay.client_gone()
        else:
            self._gone = True
            self._held = None
