"""Upstream TLS: real handshakes on 127.0.0.1 against trustme certificates.

Every connection goes to 127.0.0.1 (the pinned address) while the creator is
built for the name C{upstream.test}: the certificate is checked against that
name and SNI carries it, whatever address TCP used (RELIABILITY.md §2.10).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import attrs
import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLContextFactory,
    IReactorCore,
    IReactorSSL,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from llmobserve.proxy._tls import ExtraTrust, load_extra_trust, tls_creator

NAME = "upstream.test"
reactor: IReactorCore = _reactor


@attrs.define
class ServerSide:
    """What the TLS server saw: SNI names and application bytes."""

    sni: list[bytes | None] = attrs.field(factory=list)
    data: bytearray = attrs.field(factory=bytearray)


class _EchoOnce(Protocol):
    def __init__(self, seen: ServerSide) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.seen.data.extend(data)
        self.transport.write(b"pong")  # type: ignore[union-attr]  # connected: transport is set


@implementer(IHandshakeListener)
class _Client(Protocol):
    """Sends b"ping" once the handshake is done; fires with the reply or the failure."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()

    def handshakeCompleted(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]  # connected: transport is set

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.done.callback(data)
            self.transport.loseConnection()  # type: ignore[union-attr]  # connected: transport is set

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


def _self_signed_pem(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "extra-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def trust(ca_file: Path) -> ExtraTrust:
    return load_extra_trust(ca_file)


@pytest.fixture
def listeners() -> Iterator[list[IListeningPort]]:
    ports: list[IListeningPort] = []
    yield ports
    for port in ports:
        port.stopListening()


@implementer(IOpenSSLContextFactory)
@attrs.define
class _ServerContext:
    """An old-style context factory (what listenSSL takes) that records SNI."""

    context: SSL.Context

    def getContext(self) -> SSL.Context:
        return self.context


def serve(listeners: list[IListeningPort], key_and_cert_pem: bytes) -> tuple[int, ServerSide]:
    """A TLS server on 127.0.0.1 presenting this certificate; record what it sees."""
    seen = ServerSide()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    key = serialization.load_pem_private_key(key_and_cert_pem, password=None)
    leaf, *chain = x509.load_pem_x509_certificates(key_and_cert_pem)
    context.use_privatekey(key)  # type: ignore[arg-type]  # any key trustme or we made
    context.use_certificate(leaf)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.set_tlsext_servername_callback(lambda conn: seen.sni.append(conn.get_servername()))
    port = IReactorSSL(reactor).listenSSL(
        0,
        cast(ServerFactory, ServerFactory.forProtocol(lambda: _EchoOnce(seen))),
        _ServerContext(context),
        interface="127.0.0.1",
    )
    listeners.append(port)
    return cast(IPv4Address, port.getHost()).port, seen


def connect(port: int, hostname: str, trust: ExtraTrust | None) -> Deferred[bytes]:
    """Connect to 127.0.0.1:port (the pinned address) with TLS for `hostname`."""
    client = _Client()
    endpoint = wrapClientTLS(
        tls_creator(hostname, trust), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    connecting = endpoint.connect(Factory.forProtocol(lambda: client))
    connecting.addErrback(client.done.errback)
    return client.done


async def expect_failure(port: int, hostname: str, trust: ExtraTrust | None) -> str:
    """Connect, expect the handshake to be refused; return why, in short."""
    try:
        reply = await connect(port, hostname, trust)
    except VerificationError:
        return "hostname mismatch"
    except SSL.Error as e:
        return repr(e)
    raise AssertionError(f"handshake should have failed, got {reply!r}")


def leaf_pem(
    ca: trustme.CA,
    *names: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> bytes:
    leaf = ca.issue_cert(*names, not_before=not_before, not_after=not_after)
    return leaf.private_key_and_cert_chain_pem.bytes()


@pytest_twisted.ensureDeferred
async def test_a_right_name_with_extra_ca_verifies(
    ca: trustme.CA, trust: ExtraTrust, listeners: list[IListeningPort]
) -> None:
    """(a) A certificate for the name, from the added CA: handshake and data flow,
    and SNI is the hostname although TCP went to 127.0.0.1."""
    port, seen = serve(listeners, leaf_pem(ca, NAME))
    assert await connect(port, NAME, trust) == b"pong"
    assert seen.sni == [NAME.encode()]
    assert bytes(seen.data) == b"ping"


@pytest_twisted.ensureDeferred
async def test_b_wrong_name_fails(
    ca: trustme.CA, trust: ExtraTrust, listeners: list[IListeningPort]
) -> None:
    """(b) A valid certificate for wrong.example fails for upstream.test; no data sent."""
    port, seen = serve(listeners, leaf_pem(ca, "wrong.example"))
    assert await expect_failure(port, NAME, trust) == "hostname mismatch"
    assert seen.data == b""


@pytest_twisted.ensureDeferred
async def test_hostname_checked_is_the_given_one_not_the_address(
    ca: trustme.CA, trust: ExtraTrust, listeners: list[IListeningPort]
) -> None:
    """A certificate valid for 127.0.0.1 (the address connected to) but not for the
    target name fails: the name given to tls_creator is what is checked."""
    port, seen = serve(listeners, leaf_pem(ca, "127.0.0.1", "localhost"))
    assert await expect_failure(port, NAME, trust) == "hostname mismatch"
    assert seen.sni == [NAME.encode()]
    assert seen.data == b""


@pytest_twisted.ensureDeferred
async def test_c_self_signed_fails(trust: ExtraTrust, listeners: list[IListeningPort]) -> None:
    """(c) A self-signed certificate for the right name fails."""
    port, seen = serve(listeners, _self_signed_pem(NAME))
    assert "certificate verify failed" in await expect_failure(port, NAME, trust)
    assert seen.data == b""


@pytest_twisted.ensureDeferred
async def test_d_expired_fails(
    ca: trustme.CA, trust: ExtraTrust, listeners: list[IListeningPort]
) -> None:
    """(d) An expired certificate from the trusted CA fails."""
    now = datetime.datetime.now(datetime.UTC)
    pem = leaf_pem(
        ca,
        NAME,
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    port, seen = serve(listeners, pem)
    assert "certificate verify failed" in await expect_failure(port, NAME, trust)
    assert seen.data == b""


@pytest_twisted.ensureDeferred
async def test_e_other_ca_fails(trust: ExtraTrust, listeners: list[IListeningPort]) -> None:
    """(e) A certificate for the right name from a CA nobody added fails."""
    port, seen = serve(listeners, leaf_pem(trustme.CA(), NAME))
    assert "certificate verify failed" in await expect_failure(port, NAME, trust)
    assert seen.data == b""


@pytest_twisted.ensureDeferred
async def test_platform_trust_alone_rejects_the_test_ca(
    ca: trustme.CA, listeners: list[IListeningPort]
) -> None:
    """Without the extra CA the same good certificate fails: trust is only ever added."""
    port, seen = serve(listeners, leaf_pem(ca, NAME))
    assert "certificate verify failed" in await expect_failure(port, NAME, None)
    assert seen.data == b""


def test_creators_are_cached_per_name_and_trust(trust: ExtraTrust) -> None:
    """Building a creator per request is costly: the same key gives the same object."""
    assert tls_creator(NAME, trust) is tls_creator(NAME, trust)
    assert tls_creator(NAME, trust) is not tls_creator("other.test", trust)
    assert tls_creator(NAME, trust) is not tls_creator(NAME, None)
    assert type(tls_creator(NAME)) is type(optionsForClientTLS(NAME))


def test_names_no_certificate_can_carry_are_a_value_error() -> None:
    """An underscore host is fine for http, but TLS for it fails early and clearly."""
    with pytest.raises(ValueError):
        tls_creator("under_score.example")
    assert tls_creator("2606:4700::1") is tls_creator("2606:4700::1")


def test_extra_trust_adds_to_the_platform_roots(trust: ExtraTrust) -> None:
    """The extra CA lands in the store next to the platform's default paths."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    trust._addCACertsToContext(context)
    store = context.get_cert_store()
    assert store is not None
    assert len(trust.certificates) == 1


def test_load_extra_trust_rejects_a_file_without_certificates(tmp_path: Path) -> None:
    """A PEM path holding no certificate is an error, never an empty trust store."""
    path = tmp_path / "empty.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(ValueError):
        load_extra_trust(path)
