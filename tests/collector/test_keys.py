"""Keys in the store, the collector's verdict cache, and the link's key
check, in memory (StringTransport, Clock). The C{store} fixture is a SQLite
file and a PostgreSQL database (a real server, tests/support/postgres.py):
every test taking it is the contract both back ends keep."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from llmobserve.collector._auth import VERDICT_TTL, KeyVerifier
from llmobserve.collector._keys import KEYS_SCHEMA_VERSION, KeyStoreError
from llmobserve.collector._link import LinkRegistry, LinkServerProtocol
from llmobserve.collector._pgstore import PgEventStore
from llmobserve.collector._store import SCHEMA_VERSION, EventStore, Store
from llmobserve.collector._thread import StoreThread
from llmobserve.collector._writer import BatchWriter
from llmobserve.events._codec import FrameDecoder, encode_frame


class InlineReader:
    """A store thread stand-in: each job runs at once, on this thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.jobs = 0

    def submit(self, job: Callable[[Store], Any]) -> Deferred[Any]:
        self.jobs += 1
        return succeed(job(self.store))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = EventStore(tmp_path / "events.sqlite3")
    else:
        s = PgEventStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def _stored_bytes(store: Store) -> bytes:
    """Everything the store keeps about keys, as bytes."""
    if isinstance(store, EventStore):
        store.close()
        return store.path.read_bytes()
    import psycopg

    assert isinstance(store, PgEventStore)
    with psycopg.connect(store.url) as conn:
        rows = conn.execute("SELECT * FROM llmo_keys").fetchall()
        rows += conn.execute("SELECT * FROM llmo_key_meta").fetchall()
    return repr(rows).encode()


def test_a_key_is_shown_once_and_only_its_hmac_is_stored(store: Store) -> None:
    """C{create} returns C{llmo_...}; the file holds neither the key nor
    any part of it after the prefix; C{verify} gives its name, project and
    scope; C{list} never shows it."""
    info, key = store.keys.create("proxy-a", "team-a", "ingest")
    assert key.startswith("llmo_") and len(key) == 48
    assert info.id.startswith("k_") and key not in repr(info)
    verdict = store.keys.verify(key)
    assert (verdict.reason, verdict.name, verdict.project, verdict.scope) == (
        None,
        "proxy-a",
        "team-a",
        "ingest",
    )
    assert [k.name for k in store.keys.list()] == ["proxy-a"]
    assert key[5:].encode() not in _stored_bytes(store)


def test_unknown_missing_and_revoked_keys_are_refused(store: Store) -> None:
    """Revoking by name, by id, or by the key itself; a revoked key says so."""
    keys = [store.keys.create(f"k{i}")[1] for i in range(3)]
    infos = store.keys.list()
    assert store.keys.verify(None).reason == "missing"
    assert store.keys.verify("llmo_" + "x" * 43).reason == "unknown"
    store.keys.revoke("k0")
    store.keys.revoke(infos[1].id)
    store.keys.revoke(keys[2])
    assert [store.keys.verify(k).reason for k in keys] == ["revoked"] * 3
    assert all(k.revoked is not None for k in store.keys.list())


def test_bad_key_requests_are_errors_that_never_repeat_a_key(store: Store) -> None:
    store.keys.create("a")
    with pytest.raises(KeyStoreError, match="exists"):
        store.keys.create("a")
    with pytest.raises(KeyStoreError, match="scope"):
        store.keys.create("b", scope="write")
    secret = "llmo_" + "s" * 43
    with pytest.raises(KeyStoreError) as e:
        store.keys.revoke(secret)
    assert secret not in str(e.value)


def test_two_stores_on_one_postgres_database_share_their_keys(pg_url: str) -> None:
    """Two collectors' stores on one database (opened at once, as collectors
    starting together do): one secret, so a key made through one is valid
    through the other, and a revocation through the other is seen by both."""
    first, second = PgEventStore(pg_url), PgEventStore(pg_url)
    try:
        keys_a, keys_b = first.keys, second.keys
        _, key = keys_a.create("shared", "team-a", "ingest")
        assert keys_b.verify(key).project == "team-a"
        keys_b.revoke("shared")
        assert keys_a.verify(key).reason == "revoked"
        with pytest.raises(KeyStoreError, match="exists"):
            keys_b.create("shared")
    finally:
        first.close()
        second.close()


def test_key_tables_have_their_own_version(tmp_path: Path) -> None:
    """The event table's user_version stays 1; a key schema from a newer
    llmobserve is refused rather than misread."""
    path = tmp_path / "events.sqlite3"
    EventStore(path).keys.create("a")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.execute(
        "UPDATE llmo_key_meta SET value = ? WHERE name = 'version'",
        (str(KEYS_SCHEMA_VERSION + 1),),
    )
    db.commit()
    db.close()
    with pytest.raises(KeyStoreError, match="newer"):
        _ = EventStore(path).keys


def test_verdicts_are_remembered_for_two_seconds_only(store: Store) -> None:
    """A second check within the TTL asks nothing; after a revocation the
    cached verdict lasts until the TTL, then the store says revoked."""
    clock = Clock()
    reader = InlineReader(store)
    verifier = KeyVerifier(cast(StoreThread, reader), clock)
    _, key = store.keys.create("a", scope="read")
    seen: list[Any] = []
    verifier.check(key).addCallback(seen.append)
    verifier.check(key).addCallback(seen.append)
    assert reader.jobs == 1 and all(v.reason is None for v in seen)
    store.keys.revoke("a")
    clock.advance(VERDICT_TTL - 0.1)
    verdict = verifier.cached(key)
    assert verdict is not None and verdict.reason is None
    clock.advance(0.2)
    assert verifier.cached(key) is None
    verifier.check(key).addCallback(seen.append)
    assert seen[-1].reason == "revoked" and reader.jobs == 2


class _Writer:
    """Commits every batch at once."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    def write(self, events: list[dict[str, Any]], proxy_id: str, seq: int) -> Deferred[None]:
        self.batches.append(events)
        return succeed(None)


def _link(store: Store, clock: Clock) -> tuple[LinkServerProtocol, StringTransport, _Writer]:
    writer = _Writer()
    verifier = KeyVerifier(cast(StoreThread, InlineReader(store)), clock)
    registry = LinkRegistry(verifier=verifier)
    proto = LinkServerProtocol(cast(BatchWriter, writer), clock, registry, heartbeat=10.0)
    transport = StringTransport()
    proto.makeConnection(transport)  # type: ignore[no-untyped-call]  # inherited from unannotated Twisted
    return proto, transport, writer


def _frames(transport: StringTransport) -> list[dict[str, Any]]:
    data = transport.value()
    transport.clear()
    return FrameDecoder().feed(data)


@pytest.mark.parametrize("key", [None, "llmo_" + "x" * 43, "read"])
def test_a_link_without_an_ingest_key_gets_an_error_frame_and_is_closed(
    store: Store, key: str | None
) -> None:
    _, read = store.keys.create("r", scope="read")
    proto, transport, _ = _link(store, Clock())
    hello: dict[str, Any] = {"t": "hello", "proxy_id": "p", "version": 1}
    if key is not None:
        hello["key"] = read if key == "read" else key
    proto.dataReceived(encode_frame(hello))
    frames = _frames(transport)
    assert [f["t"] for f in frames] == ["error"]
    assert frames[0]["reason"] == "unauthorized"
    assert read not in frames[0]["message"]
    assert transport.disconnecting


def test_events_take_the_link_keys_project_and_a_revoked_key_closes_the_link(
    store: Store,
) -> None:
    """An ingest key's link stores its events under the key's project (an
    event's own project is replaced); revoked, the link is closed at its
    first batch after the verdict's TTL."""
    _, key = store.keys.create("p", project="team-a")
    clock = Clock()
    proto, transport, writer = _link(store, clock)
    proto.dataReceived(encode_frame({"t": "hello", "proxy_id": "p", "version": 1, "key": key}))
    assert [f["t"] for f in _frames(transport)] == ["welcome"]
    batch = {"t": "batch", "seq": 1, "events": [{"id": "a", "project": "team-b"}, {"id": "b"}]}
    proto.dataReceived(encode_frame(batch))
    assert [e["project"] for e in writer.batches[0]] == ["team-a", "team-a"]
    assert [f["t"] for f in _frames(transport)] == ["ack"]
    store.keys.revoke("p")
    clock.advance(VERDICT_TTL + 0.1)
    proto.dataReceived(encode_frame({"t": "batch", "seq": 2, "events": [{"id": "c"}]}))
    assert "error" in [f["t"] for f in _frames(transport)]
    assert transport.disconnecting


@pytest.mark.parametrize(
    ("argv", "required"),
    [
        (["--port", "8000"], False),  # a bare port is 127.0.0.1
        (["--port", "tcp:8000:interface=127.0.0.1", "--require-keys"], True),
        (["--port", "tcp:8000"], True),  # every interface
        (["--port", "tcp:8000:interface=0.0.0.0"], True),
        (["--port", "tcp6:8000:interface=\\:\\:1"], False),
    ],
)
def test_keys_are_required_beyond_loopback_or_when_asked(
    tmp_path: Path, argv: list[str], required: bool
) -> None:
    """The collector built by C{twistd llmobserve-collector} (not started)."""
    from llmobserve.collector._tap import Options, makeService

    options = Options()
    options.parseOptions([*argv, "--db", str(tmp_path / "c.sqlite3")])
    service = makeService(options)
    assert service.require_keys is required  # type: ignore[attr-defined]  # a CollectorService


def test_a_postgres_collector_requires_keys_when_asked(pg_url: str) -> None:
    """C{--require-keys} (or a port beyond loopback) on a PostgreSQL store
    builds a collector that requires keys, as on SQLite (it used to refuse)."""
    from llmobserve.collector._tap import Options, makeService

    options = Options()
    options.parseOptions(
        ["--port", "tcp:8000:interface=127.0.0.1", "--require-keys", "--db", pg_url]
    )
    service = makeService(options)
    assert service.require_keys is True  # type: ignore[attr-defined]  # a CollectorService
