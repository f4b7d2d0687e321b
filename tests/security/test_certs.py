"""The CA, the certificates it issues, and the identities they carry.

Spec (``tessera.security.certs`` and ``identity``): a CA is never overwritten;
a certificate carries one URI SAN ``spiffe://tessera/<role>/<name>`` and the
DNS SAN ``<name>.<role>.tessera`` (schedulers also ``scheduler.tessera``);
every file holding a private key is mode 0600; bad input is a
``CertificateError`` naming the command-line flag at fault; an identity is
exactly ``spiffe://tessera/<known role>/<name>``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.security import certs
from tessera.security.identity import (
    SCHEDULER_DNS_NAME,
    Identity,
    IdentityError,
    Role,
    agent_dns_name,
    check_name,
)
from tessera.security.tls import identity_of_pem

from .pki import Pki, load_cert


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """A umask that lets every new file be world-readable unless the code says otherwise."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- the CA ----------------------------------------------------------------------------


def test_create_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "ca", common_name="Test CA", days=10)
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / certs.CA_CERT).read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0
    assert mode(tmp_path / "ca" / certs.CA_KEY) == 0o600


def test_create_ca_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    certs.create_ca(tmp_path / "ca")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    with pytest.raises(certs.CertificateError, match="refusing to overwrite"):
        certs.create_ca(tmp_path / "ca")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before


@pytest.mark.parametrize("survivor", [certs.CA_CERT, certs.CA_KEY])
def test_create_ca_refuses_a_directory_holding_half_a_ca(tmp_path: Path, survivor: str) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / survivor).write_bytes(b"precious")
    with pytest.raises(certs.CertificateError):
        certs.create_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / survivor).read_bytes() == b"precious"


@pytest.mark.parametrize("days", [0, -1, 3_000_000], ids=["zero", "negative", "past year 9999"])
def test_create_ca_refuses_bad_days_naming_the_flag(tmp_path: Path, days: int) -> None:
    with pytest.raises(certs.CertificateError, match="--days"):
        certs.create_ca(tmp_path / "ca", days=days)


# -- issued certificates ---------------------------------------------------------------

ISSUED: dict[str, tuple[Role, str, list[str]]] = {
    "an agent's names its host": (Role.AGENT, "dgx-07", ["dgx-07.agent.tessera"]),
    "a tenant's names the tenant": (Role.TENANT, "acme", ["acme.tenant.tessera"]),
    "a frontend's names the frontend": (Role.FRONTEND, "portal", ["portal.frontend.tessera"]),
    "an admin's names the admin": (Role.ADMIN, "ops", ["ops.admin.tessera"]),
    "a store's names the store": (Role.STORE, "valkey-0", ["valkey-0.store.tessera"]),
    "a scheduler's also names scheduler.tessera": (
        Role.SCHEDULER,
        "sched-1",
        ["sched-1.scheduler.tessera", "scheduler.tessera"],
    ),
}


@pytest.mark.parametrize(
    ("role", "name", "dns"), [pytest.param(*v, id=k) for k, v in ISSUED.items()]
)
def test_an_issued_certificate_carries_one_uri_san_and_its_dns_sans(
    pki: Pki, role: Role, name: str, dns: list[str]
) -> None:
    cert = load_cert(pki.issue(role, name))
    san = sans(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://tessera/{role.value}/{name}"
    ]
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns)
    assert san.get_values_for_type(x509.IPAddress) == []


def test_extra_dns_and_ip_sans_are_added_beside_the_identitys(pki: Pki) -> None:
    cert = load_cert(
        pki.issue(
            Role.STORE,
            "valkey-0",
            dns_names=["valkey.internal"],
            ip_addresses=["10.0.0.9", "::1"],
        )
    )
    san = sans(cert)
    assert len(san.get_values_for_type(x509.UniformResourceIdentifier)) == 1
    assert sorted(san.get_values_for_type(x509.DNSName)) == [
        "valkey-0.store.tessera",
        "valkey.internal",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.9"),
        ipaddress.ip_address("::1"),
    ]


def test_an_issued_certificate_is_signed_by_the_ca_and_serves_and_calls(pki: Pki) -> None:
    out = pki.issue(Role.AGENT, "dgx-07", days=3)
    cert = load_cert(out)
    ca = x509.load_pem_x509_certificate((pki.ca / certs.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (out / certs.CA_CERT).read_bytes() == (pki.ca / certs.CA_CERT).read_bytes()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3) <= lifetime <= dt.timedelta(days=3, minutes=10)


def test_the_key_file_holds_the_key_of_the_certificate(pki: Pki) -> None:
    out = pki.issue(Role.TENANT, "acme")
    key = serialization.load_pem_private_key((out / certs.KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == load_cert(out).public_key()


def test_not_before_sets_the_start_of_validity(pki: Pki) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=2)
    cert = load_cert(pki.issue(Role.TENANT, "acme", not_before=start, days=1))
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)


def test_key_files_are_0600_even_under_a_umask_of_0(pki: Pki, wide_umask: None) -> None:
    out = pki.issue(Role.TENANT, "acme")
    assert mode(out / certs.KEY) == 0o600
    assert mode(pki.ca / certs.CA_KEY) == 0o600
    certs.create_ca(pki.root / "other-ca")
    assert mode(pki.root / "other-ca" / certs.CA_KEY) == 0o600


def test_no_private_key_file_is_ever_readable_by_group_or_world(pki: Pki, wide_umask: None) -> None:
    out = pki.issue(Role.TENANT, "acme")
    # A key file an operator opened up is closed again by the next issue.
    (out / certs.KEY).chmod(0o644)
    pki.issue(Role.TENANT, "acme", out=out)
    leaks = [
        p.name
        for d in (out, pki.ca)
        for p in d.iterdir()
        if b"PRIVATE KEY" in p.read_bytes() and mode(p) & (stat.S_IRWXG | stat.S_IRWXO)
    ]
    assert leaks == []
    assert mode(out / certs.KEY) == 0o600


def test_reissuing_replaces_the_pair_and_leaves_no_temporary_file(pki: Pki) -> None:
    out = pki.issue(Role.AGENT, "dgx-07")
    first = load_cert(out).serial_number
    pki.issue(Role.AGENT, "dgx-07", out=out)
    assert load_cert(out).serial_number != first
    assert sorted(p.name for p in out.iterdir()) == sorted([certs.CA_CERT, certs.CERT, certs.KEY])


def test_write_private_writes_atomically_with_the_mode_asked(tmp_path: Path) -> None:
    certs.write_private(tmp_path / "f", b"one")
    certs.write_private(tmp_path / "f", b"two", mode=0o640)
    assert (tmp_path / "f").read_bytes() == b"two"
    assert mode(tmp_path / "f") == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# -- refusals name the flag ----------------------------------------------------------

BAD_ISSUES: dict[str, tuple[dict[str, object], str]] = {
    "an unknown role": ({"role": "wizard"}, "--role"),
    "an empty role": ({"role": ""}, "--role"),
    "a name with a slash": ({"name": "a/b"}, "--name"),
    "a name of two dots": ({"name": ".."}, "--name"),
    "an empty name": ({"name": ""}, "--name"),
    "a name with a space": ({"name": "a b"}, "--name"),
    "a 129-character name": ({"name": "a" * 129}, "--name"),
    "a name ending in a newline": ({"name": "dgx-07\n"}, "--name"),
    "zero days": ({"days": 0}, "--days"),
    "negative days": ({"days": -5}, "--days"),
    "more days than a date can hold": ({"days": 3_000_000}, "--days"),
    "an ip that is not an address": ({"ip_addresses": ["10.0.0.300"]}, "--ip"),
    "an ip that is a host name": ({"ip_addresses": ["valkey.internal"]}, "--ip"),
    "a dns name with a space": ({"dns_names": ["bad name"]}, "--dns"),
    "a dns name that is not ASCII": ({"dns_names": ["exämple.com"]}, "--dns"),
}


@pytest.mark.parametrize(
    ("changes", "flag"), [pytest.param(*v, id=k) for k, v in BAD_ISSUES.items()]
)
def test_issue_refuses_bad_input_naming_the_flag(
    pki: Pki, changes: dict[str, object], flag: str
) -> None:
    args: dict[str, object] = {"role": "agent", "name": "dgx-07"} | changes
    out = pki.root / "out"
    with pytest.raises(certs.CertificateError) as err:
        certs.issue(
            pki.ca,
            str(args.pop("role")),
            str(args.pop("name")),
            out,
            **args,  # type: ignore[arg-type]
        )
    assert flag in str(err.value)
    assert not (out / certs.KEY).exists()


def test_issue_refuses_a_directory_that_holds_no_ca_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(certs.CertificateError, match="--ca"):
        certs.issue(tmp_path / "nowhere", "agent", "dgx-07", tmp_path / "out")


def test_issue_refuses_an_unreadable_ca_naming_the_flag(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / certs.CA_CERT).write_bytes(b"not a certificate")
    (tmp_path / "ca" / certs.CA_KEY).write_bytes(b"not a key")
    with pytest.raises(certs.CertificateError, match="--ca"):
        certs.issue(tmp_path / "ca", "agent", "dgx-07", tmp_path / "out")


# -- identities ----------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_the_identity_round_trips_through_the_certificate(pki: Pki, role: Role) -> None:
    out = pki.issue(role, "node-1.example_x")
    identity = identity_of_pem((out / certs.CERT).read_bytes())
    assert identity == Identity(role, "node-1.example_x")
    assert Identity.parse(identity.uri) == identity


def test_an_identity_names_its_uri_and_dns_san() -> None:
    agent = Identity(Role.AGENT, "dgx-07")
    assert agent.uri == "spiffe://tessera/agent/dgx-07"
    assert agent.dns_name == "dgx-07.agent.tessera"
    assert str(agent) == "agent/dgx-07"
    assert agent_dns_name("dgx-07") == agent.dns_name
    assert SCHEDULER_DNS_NAME == "scheduler.tessera"


NOT_IDENTITIES: dict[str, str] = {
    "another trust domain": "spiffe://example.org/tenant/acme",
    "a trust domain that only starts like tessera": "spiffe://tesserax/tenant/acme",
    "a port after the trust domain": "spiffe://tessera:443/tenant/acme",
    "user info before the trust domain": "spiffe://evil@tessera/tenant/acme",
    "another scheme": "https://tessera/tenant/acme",
    "an unknown role": "spiffe://tessera/wizard/merlin",
    "a role in capitals": "spiffe://tessera/ADMIN/ops",
    "no name": "spiffe://tessera/admin",
    "an empty name": "spiffe://tessera/admin/",
    "an empty role": "spiffe://tessera//acme",
    "a name with a further path segment": "spiffe://tessera/agent/a/b",
    "a name of two dots": "spiffe://tessera/agent/..",
    "a name that climbs up": "spiffe://tessera/agent/../admin/ops",
    "a name with dots inside": "spiffe://tessera/agent/a..b",
    "a name starting with a dot": "spiffe://tessera/agent/.hidden",
    "a name ending with a dash": "spiffe://tessera/agent/dgx-",
    "a percent-encoded name": "spiffe://tessera/agent/%2e%2e",
    "a query": "spiffe://tessera/agent/dgx-07?admin=1",
    "a fragment": "spiffe://tessera/agent/dgx-07#x",
    "a name ending in a newline": "spiffe://tessera/tenant/acme\n",
    "a NUL in the name": "spiffe://tessera/tenant/acme\x00admin",
    "a 300-character URI": "spiffe://tessera/tenant/" + "a" * 276,
    "a 129-character name": "spiffe://tessera/tenant/" + "a" * 129,
    "nothing": "",
}


@pytest.mark.parametrize("uri", [pytest.param(v, id=k) for k, v in NOT_IDENTITIES.items()])
def test_parse_refuses_what_is_not_a_tessera_identity(uri: str) -> None:
    with pytest.raises(IdentityError):
        Identity.parse(uri)


def test_parse_accepts_a_128_character_name() -> None:
    name = "a" * 128
    assert Identity.parse(f"spiffe://tessera/tenant/{name}") == Identity(Role.TENANT, name)


def test_parse_refusals_do_not_echo_a_long_uri() -> None:
    with pytest.raises(IdentityError) as err:
        Identity.parse("spiffe://tessera/" + "w" * 5000 + "/x")
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("name", ["acme\n", "\nacme", "acme\r", "ac\tme", " acme", "acme "])
def test_check_name_refuses_whitespace_anywhere(name: str) -> None:
    with pytest.raises(IdentityError):
        check_name(name)


def test_an_identity_cannot_be_built_with_a_bad_name() -> None:
    with pytest.raises(IdentityError):
        Identity(Role.TENANT, "a/b")
