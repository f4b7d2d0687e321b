"""A throwaway PKI for the security tests: a real CA, real certificates, real TLS servers.

:class:`Pki` wraps :func:`tessera.security.certs.create_ca` and
:func:`~tessera.security.certs.issue`; :meth:`Pki.custom` signs certificates
the production code would never issue (no URI SAN, a foreign trust domain, two
identities), written in the same ``ca.pem``/``cert.pem``/``key.pem`` layout.

:func:`serving` runs a ``grpc.aio`` server on ``127.0.0.1`` port 0 for the
length of an ``async with`` block; :func:`peer_certificate` reads the
certificate a server presents, with the ``ssl`` module, so a test can see which
one it serves after a rotation.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.security import certs
from tessera.security.identity import Role


def load_cert(directory: Path) -> x509.Certificate:
    """The certificate in ``directory/cert.pem``."""
    return x509.load_pem_x509_certificate((directory / certs.CERT).read_bytes())


class Pki:
    """A CA in ``root/ca`` and the identity directories it issued under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca"
        certs.create_ca(self.ca)
        self._count = 0

    def _fresh(self, label: str) -> Path:
        self._count += 1
        return self.root / f"{label}-{self._count}"

    def issue(self, role: Role | str, name: str, out: Path | None = None, **kw: Any) -> Path:
        """A TLS directory (ca.pem, cert.pem, key.pem) for ``role/name``; ``out`` to re-issue."""
        role_text = role.value if isinstance(role, Role) else role
        target = out if out is not None else self._fresh(f"{role_text}-{name}")
        certs.issue(self.ca, role_text, name, target, **kw)
        return target

    def custom(
        self,
        sans: Sequence[x509.GeneralName],
        *,
        not_before: dt.datetime | None = None,
        days: int = 30,
    ) -> Path:
        """A directory holding a certificate signed by this CA with exactly ``sans``."""
        ca_cert = x509.load_pem_x509_certificate((self.ca / certs.CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key(
            (self.ca / certs.CA_KEY).read_bytes(), password=None
        )
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        out = self._fresh("custom")
        out.mkdir(parents=True)
        (out / certs.CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (out / certs.CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / certs.KEY).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return out


def raw_credentials(directory: Path, *, with_cert: bool = True) -> grpc.ChannelCredentials:
    """Client credentials straight from the files, for directories TlsDir would refuse."""
    ca = (directory / certs.CA_CERT).read_bytes()
    if not with_cert:
        return grpc.ssl_channel_credentials(ca)
    return grpc.ssl_channel_credentials(
        ca, (directory / certs.KEY).read_bytes(), (directory / certs.CERT).read_bytes()
    )


@asynccontextmanager
async def serving(
    register: Callable[[grpc.aio.Server], None],
    credentials: grpc.ServerCredentials | None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, int]] = (),
) -> AsyncIterator[str]:
    """A started server on ``127.0.0.1:0`` (TLS unless ``credentials`` is None); its address."""
    server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
    register(server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port != 0
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def peer_certificate(address: str, client_dir: Path, server_name: str) -> x509.Certificate:
    """The certificate a TLS server presents to a client of ``client_dir`` (blocking)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(client_dir / certs.CA_CERT))
    ctx.load_cert_chain(client_dir / certs.CERT, client_dir / certs.KEY)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
