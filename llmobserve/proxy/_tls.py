"""The upstream TLS client context: the chain and the hostname are always verified.

The relay connects to the address that L{TargetPolicy
<llmobserve.proxy._policy.TargetPolicy>} checked, which is usually an IP, but
TLS must still be about the target's I{name}: L{tls_creator} gives SNI and
the certificate check the hostname, whatever address the TCP connection
goes to. Verification is Twisted's own (C{optionsForClientTLS}: the chain
against the trust root, the name with C{service_identity}), the same as
C{BrowserLikePolicyForHTTPS}.

There is deliberately no option that disables verification. A corporate
TLS-inspecting gateway or a test upstream is trusted by I{adding} its CA
with L{load_extra_trust}; the platform's roots stay trusted and every
certificate is still checked against the hostname.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import hyperlink
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from zope.interface import implementer

from llmobserve.proxy._compat import IOpenSSLTrustRoot

__all__ = ["ExtraTrust", "collector_endpoint", "load_extra_trust", "tls_creator"]

_CREATORS_MAX = 1024
_creators: dict[tuple[str, IOpenSSLTrustRoot | None], IOpenSSLClientConnectionCreator] = {}


def tls_creator(
    hostname: str, trust_root: IOpenSSLTrustRoot | None = None
) -> IOpenSSLClientConnectionCreator:
    """The TLS connection creator for an upstream named C{hostname}.

    Wrap the TCP endpoint of the I{pinned address} with it
    (C{wrapClientTLS(tls_creator(target.host, trust), endpoint)}): SNI and
    the certificate's name are C{hostname}; an IP literal is checked against
    the certificate's IP addresses and sends no SNI.

    Cached per (hostname, trust root), because each creator owns an OpenSSL
    context whose set-up (loading the trust store) is far too costly per
    request. The cache is bounded; it is cleared when full.

    @param trust_root: None for the platform's roots, or an
        L{ExtraTrust} from L{load_extra_trust}.
    @raise ValueError: for a name no certificate can carry (e.g. one with
        an underscore, which plain-http targets may have); answer 502.
    """
    key = (hostname, trust_root)
    creator = _creators.get(key)
    if creator is None:
        if len(_creators) >= _CREATORS_MAX:
            _creators.clear()
        try:
            creator = optionsForClientTLS(hostname, trustRoot=trust_root)
        except UnicodeError as e:  # idna.IDNAError: not a valid IDNA host name
            raise ValueError(f"{hostname!r} cannot be verified over TLS: {e}") from None
        _creators[key] = creator
    return creator


@implementer(IOpenSSLTrustRoot)
@attrs.frozen(eq=False)  # hashed by identity: load once, reuse for the cache
class ExtraTrust:
    """The platform's trust roots plus some extra CA certificates.

    It only adds trust: the platform roots keep working and nothing
    turns verification off.
    """

    certificates: tuple[crypto.X509, ...]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        platformTrust()._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None  # a fresh client context always has one
        for certificate in self.certificates:
            store.add_cert(certificate)


def load_extra_trust(pem_path: str | Path) -> ExtraTrust:
    """Trust the CA certificates in a PEM bundle in addition to the platform's.

    For C{--ca-bundle}: corporate CAs and test CAs. Raises L{ValueError}
    when the file holds no certificate, L{OSError} when it cannot be read.
    """
    data = Path(pem_path).read_bytes()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"no PEM certificate in {str(pem_path)!r}: {e}") from None
    return ExtraTrust(tuple(crypto.X509.from_cryptography(c) for c in certificates))


def collector_endpoint(
    reactor: Any,
    url: str,
    *,
    ca_file: str | Path | None = None,
    timeout: float = 5.0,
) -> IStreamClientEndpoint | None:
    """The link's endpoint for an C{https://HOST:PORT} collector URL: TCP to
    HOST, then TLS whose certificate must be valid for HOST (the chain
    against the platform's roots and C{ca_file}'s CAs). C{None} for a plain
    C{http://} URL, whose endpoint the pipeline makes itself.

    @raise ValueError: an unusable URL, or a C{ca_file} with no certificate.
    @raise OSError: C{ca_file} cannot be read.
    """
    text = url if "://" in url else f"http://{url}"
    parsed = hyperlink.URL.from_text(text)
    if parsed.scheme != "https":
        if ca_file is not None:
            raise ValueError("--collector-ca-file needs an https:// collector URL")
        return None
    if not parsed.host:
        raise ValueError(f"collector URL has no host: {url!r}")
    trust = None if ca_file is None else load_extra_trust(ca_file)
    tcp = HostnameEndpoint(reactor, parsed.host, parsed.port or 443, timeout=timeout)
    return wrapClientTLS(tls_creator(parsed.host, trust), tcp)
