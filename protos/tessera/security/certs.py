"""A certificate authority for Tessera identities, and the certificates it issues.

``tessera certs ca DIR`` and ``tessera certs issue`` are thin wrappers around
:func:`create_ca` and :func:`issue`. Operators who run their own CA
(cert-manager, Vault) need none of this: a process only reads ``ca.pem``,
``cert.pem`` and ``key.pem`` from its TLS directory, and a certificate works when
it carries the identity's URI SAN and DNS SAN (see :mod:`tessera.security.identity`).

Keys are ECDSA P-256; every file holding a private key is written with mode
0600, through a temporary file renamed into place, so a process reloading its
directory never reads half a file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.security.identity import SCHEDULER_DNS_NAME, Identity, Role

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CERT = "cert.pem"
KEY = "key.pem"

#: Certificates are valid from a little before "now": clocks of hosts differ.
_CLOCK_SKEW = dt.timedelta(minutes=5)

#: Longest validity asked for: a century (datetime stops at year 9999).
MAX_DAYS = 36500

#: A DNS SAN: ASCII labels of letters, digits and hyphens, a leading ``*.``
#: allowed (a wildcard covers one label).
_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise CertificateError(f"--days: must be between 1 and {MAX_DAYS}")


class CertificateError(ValueError):
    """A CA directory or certificate that cannot be used."""


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, readable only by its owner (by default).

    The temporary file is created with ``mode`` already set, so the content is
    never readable by others, not even for a moment.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(directory: Path, *, common_name: str = "Tessera CA", days: int = 3650) -> None:
    """Create a CA: ``ca.pem`` (share it) and ``ca-key.pem`` (0600, keep it offline).

    Raises:
        CertificateError: ``directory`` already holds a CA (never overwritten).
    """
    _check_days(days)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise CertificateError(f"{directory} already holds a CA; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # A CA that signs leaf certificates only: no intermediates below it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY, _key_pem(key))
    write_private(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as err:
        raise CertificateError(f"--ca {ca_dir}: no {Path(err.filename).name}") from None
    except ValueError as err:
        raise CertificateError(f"--ca {ca_dir}: unreadable CA ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"--ca {ca_dir}: the CA key is not an ECDSA key")
    return cert, key


def identity_sans(identity: Identity) -> list[str]:
    """The DNS SANs a certificate of ``identity`` carries."""
    names = [identity.dns_name]
    if identity.role is Role.SCHEDULER:
        names.append(SCHEDULER_DNS_NAME)
    return names


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    out_dir: Path,
    *,
    days: int = 365,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    not_before: dt.datetime | None = None,
) -> Identity:
    """Issue a key and certificate for one identity into ``out_dir``.

    Writes ``ca.pem`` (a copy of the CA certificate, what peers are checked
    against), ``cert.pem`` and ``key.pem`` (0600): the layout ``--tls-dir``
    reads. Re-issuing into the same directory replaces them, which a running
    process picks up (rotation).

    Args:
        ca_dir: a directory made by :func:`create_ca`.
        role: one of :class:`Role`'s values.
        name: the identity's name (a host id for an agent, a tenant's name).
        out_dir: created if missing.
        days: validity.
        dns_names: extra DNS SANs (a store's host name).
        ip_addresses: extra IP SANs (a store reached by address).
        not_before: start of validity (default: now less a few minutes);
            tests use it to make expired certificates.

    Raises:
        CertificateError: bad role, name, SAN or CA.
    """
    try:
        identity = Identity(Role(role), name)
    except ValueError as err:
        known = ", ".join(r.value for r in Role)
        raise CertificateError(f"--role {role!r} / --name: {err} (roles: {known})") from None
    _check_days(days)
    for dns in dns_names:
        if len(dns) > 253 or not _DNS_NAME.fullmatch(dns):
            shown = dns if len(dns) <= 64 else dns[:61] + "..."
            raise CertificateError(f"--dns {shown!r}: not a DNS name (ASCII labels, '*.' first)")
    try:
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as err:
        raise CertificateError(f"--ip: {err}") from None
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in [*identity_sans(identity), *dns_names]]
    sans += [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # Every process both serves and calls (the agent serves the scheduler
        # and calls its registry), so one certificate does both.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private(out_dir / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    # Key before certificate: a reloading process checks the pair matches,
    # and keeps its old one until both are new.
    write_private(out_dir / KEY, _key_pem(key))
    write_private(out_dir / CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return identity


def browser_bundle(tls_dir: Path, out: Path, password: bytes) -> Identity:
    """Write a TLS directory's certificate and key as one PKCS#12 file (0600) for a browser.

    Browsers import client certificates as PKCS#12 (``.p12``) files, which
    hold the key encrypted under ``password``; the dashboard then knows the
    browser as the identity in the certificate.

    Args:
        tls_dir: holds ``cert.pem`` and ``key.pem``.
        out: the file to write.
        password: what the browser asks for on import (at least 8 bytes).

    Raises:
        CertificateError: unreadable files, or a password too short.
    """
    if len(password) < 8:
        raise CertificateError("the bundle's password must be at least 8 characters")
    try:
        cert = x509.load_pem_x509_certificate((tls_dir / CERT).read_bytes())
        key = serialization.load_pem_private_key((tls_dir / KEY).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise CertificateError(f"{tls_dir}: cannot read the certificate and key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{tls_dir}: the key is not an ECDSA key")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        identity = Identity.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
    except (x509.ExtensionNotFound, IndexError, ValueError) as err:
        raise CertificateError(f"{tls_dir}: the certificate names no identity ({err})") from None
    data = pkcs12.serialize_key_and_certificates(
        str(identity).encode(),
        key,
        cert,
        None,
        serialization.BestAvailableEncryption(password),
    )
    write_private(out, data)
    return identity
