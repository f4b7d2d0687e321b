"""HTTPS from a TLS directory: client certificates asked for, not required, and rotation.

Spec (``TlsDir.http_server_context``, what the dashboard serves with):

* The server presents this process's certificate and asks each client for
  one: a client certificate signed by the CA is verified and visible to the
  server on the connection; a client without one still completes the
  handshake (``CERT_OPTIONAL``: ``/healthz`` must stay reachable); a client
  certificate from another CA fails the handshake.
* Rotation without a restart: once the files changed (looked at once a
  second at most), a new connection is served with the new certificate,
  still checking clients against the CA. This holds for clients that send no
  server name (SNI), as browsers and probes connecting by IP address do: the
  context rotates in its ``sni_callback``, which must run for them too.
* A half-written rotation (new key, old certificate) is not used: the old
  certificate is served until the pair is whole.

Every server is a real aiohttp server on ``127.0.0.1`` port 0 (as the
dashboard's ``start_http``); clients are blocking ``ssl`` sockets in a thread,
speaking plain HTTP/1.1, with real certificates from :class:`~.pki.Pki`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.security import certs
from tessera.security.identity import SCHEDULER_DNS_NAME, Role
from tessera.security.tls import TlsDir, identity_of_pem

from ..conftest import Runner
from .pki import Pki, load_cert

#: Longer than TlsDir's once-a-second look at the files.
ROTATION_WAIT_S = 1.2

#: What the test server answers a client that showed no certificate.
ANONYMOUS = "anonymous"

#: Connect by IP address: CPython sends no SNI for an IP, and checks the IP SAN.
BY_IP = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """What a client saw: the server's certificate and the body of ``GET /whoami``."""

    server_cert: x509.Certificate
    body: str


def server_dir(pki: Pki) -> Path:
    """The scheduler's TLS directory, its certificate valid for 127.0.0.1 too."""
    return pki.issue(Role.SCHEDULER, "sched-1", ip_addresses=[BY_IP])


def reissue(pki: Pki, directory: Path) -> x509.Certificate:
    """Rotate: a new key and certificate for the same identity, into the same directory."""
    pki.issue(Role.SCHEDULER, "sched-1", out=directory, ip_addresses=[BY_IP])
    return load_cert(directory)


@asynccontextmanager
async def https(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[bytes | None]]]:
    """An aiohttp server on 127.0.0.1:0 serving ``GET /whoami``; its port and what it saw.

    ``/whoami`` answers ``<role>/<name> <serial>`` of the client's certificate
    (read from the connection, as the dashboard does), or ``anonymous``. Each
    request's client certificate (DER, or None) is appended to the list.
    """
    seen: list[bytes | None] = []

    async def whoami(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        sslobj = transport.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject)
        der = sslobj.getpeercert(binary_form=True)
        seen.append(der)
        if not der:
            return web.Response(text=ANONYMOUS)
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        serial = x509.load_pem_x509_certificate(pem).serial_number
        return web.Response(text=f"{identity_of_pem(pem)} {serial}")

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(runner.addresses[0][1]), seen
    finally:
        await runner.cleanup()


def whoami(
    port: int, trust: Path, client: Path | None, server_hostname: str | None = BY_IP
) -> Reply:
    """``GET /whoami`` on a new TLS connection (blocking).

    Args:
        port: the server's port on 127.0.0.1.
        trust: a directory whose ``ca.pem`` the client checks the server against.
        client: a directory whose ``cert.pem`` and ``key.pem`` the client
            presents; None: no client certificate.
        server_hostname: the name checked in the server's certificate and
            sent as SNI (an IP address is checked but never sent); None:
            neither sent nor checked (the chain still is).

    Raises:
        ssl.SSLError, ConnectionError: the handshake failed, or the server
            closed the connection without a reply.
    """
    ctx = ssl.create_default_context(cafile=str(trust / certs.CA_CERT))
    if server_hostname is None:
        ctx.check_hostname = False
    if client is not None:
        ctx.load_cert_chain(client / certs.CERT, client / certs.KEY)
    request = f"GET /whoami HTTP/1.1\r\nHost: {BY_IP}\r\nConnection: close\r\n\r\n".encode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=server_hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    if not data:
        raise ConnectionError("the server closed the connection without a reply")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return Reply(x509.load_der_x509_certificate(der), body.decode())


def who(directory: Path) -> str:
    """What ``/whoami`` answers a client presenting ``directory``'s certificate."""
    cert = load_cert(directory)
    return f"{identity_of_pem((directory / certs.CERT).read_bytes())} {cert.serial_number}"


# -- who may connect -----------------------------------------------------------------


def test_a_client_with_a_certificate_from_the_ca_is_verified_and_seen(
    pki: Pki, arun: Runner
) -> None:
    server = server_dir(pki)
    viewer = pki.issue(Role.VIEWER, "ops")

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, seen):
            reply = await asyncio.to_thread(whoami, port, server, viewer)
            assert reply.body == who(viewer) == f"viewer/ops {load_cert(viewer).serial_number}"
            assert reply.server_cert.serial_number == load_cert(server).serial_number
            assert seen == [load_cert(viewer).public_bytes(serialization.Encoding.DER)]

    arun(body())


def test_a_client_without_a_certificate_completes_the_handshake(pki: Pki, arun: Runner) -> None:
    server = server_dir(pki)

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, seen):
            reply = await asyncio.to_thread(whoami, port, server, None)
            assert reply.body == ANONYMOUS
            assert seen == [None]

    arun(body())


def test_a_client_certificate_from_another_ca_fails_the_handshake(
    pki: Pki, tmp_path: Path, arun: Runner
) -> None:
    server = server_dir(pki)
    # Same role and name, signed by a CA of the attacker's making.
    forged = Pki(tmp_path / "other").issue(Role.VIEWER, "ops")

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, seen):
            # TLS 1.3: the client may finish its side before the server's
            # alert arrives, so the refusal shows at the latest on reading.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(whoami, port, server, forged)
            assert seen == []  # no request reached the application
            # The server is fine and still serves good clients.
            good = pki.issue(Role.VIEWER, "ops")
            assert (await asyncio.to_thread(whoami, port, server, good)).body == who(good)

    arun(body())


def test_a_self_signed_client_certificate_fails_the_handshake(
    pki: Pki, tmp_path: Path, arun: Runner
) -> None:
    server = server_dir(pki)
    lone = tmp_path / "lone"
    lone.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lone")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (lone / certs.CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (lone / certs.KEY).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, seen):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(whoami, port, server, lone)
            assert seen == []

    arun(body())


# -- rotation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_hostname",
    [BY_IP, None, SCHEDULER_DNS_NAME],
    ids=["by-ip-no-sni", "no-name-no-sni", "by-name-with-sni"],
)
def test_a_new_connection_after_rotation_is_served_the_new_certificate(
    pki: Pki, arun: Runner, server_hostname: str | None
) -> None:
    """Browsers and probes reaching the dashboard by IP send no SNI; rotation must reach them."""
    server = server_dir(pki)
    viewer = pki.issue(Role.VIEWER, "ops")
    old = load_cert(server).serial_number

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, _seen):

            async def fetch(client: Path | None) -> Reply:
                return await asyncio.to_thread(whoami, port, server, client, server_hostname)

            assert (await fetch(viewer)).server_cert.serial_number == old
            new = reissue(pki, server).serial_number
            assert new != old
            await asyncio.sleep(ROTATION_WAIT_S)
            after = await fetch(viewer)
            assert after.server_cert.serial_number == new, (
                f"still served the certificate of serial {old} after rotation "
                f"(server_hostname={server_hostname!r})"
            )
            # The rotated context still checks clients against the CA, and still
            # lets a client without a certificate in.
            assert after.body == who(viewer)
            anonymous = await fetch(None)
            assert anonymous.body == ANONYMOUS
            assert anonymous.server_cert.serial_number == new

    arun(body())


def test_after_rotation_a_certificate_from_another_ca_is_still_refused(
    pki: Pki, tmp_path: Path, arun: Runner
) -> None:
    server = server_dir(pki)
    forged = Pki(tmp_path / "other").issue(Role.VIEWER, "ops")

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, seen):
            await asyncio.to_thread(whoami, port, server, None)  # before the rotation
            new = reissue(pki, server).serial_number
            await asyncio.sleep(ROTATION_WAIT_S)
            reply = await asyncio.to_thread(whoami, port, server, None)
            assert reply.server_cert.serial_number == new
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(whoami, port, server, forged)
            assert seen == [None, None]

    arun(body())


def test_a_half_written_rotation_keeps_the_old_certificate_until_the_pair_is_whole(
    pki: Pki, tmp_path: Path, arun: Runner
) -> None:
    server = server_dir(pki)
    old = load_cert(server).serial_number
    # The next pair, issued aside; its key is written first, as `tessera certs` does.
    staged = pki.issue(Role.SCHEDULER, "sched-1", out=tmp_path / "staged", ip_addresses=[BY_IP])
    new = load_cert(staged).serial_number

    async def body() -> None:
        async with https(TlsDir(server).http_server_context()) as (port, _seen):
            await asyncio.to_thread(whoami, port, server, None)
            (server / certs.KEY).write_bytes((staged / certs.KEY).read_bytes())
            await asyncio.sleep(ROTATION_WAIT_S)
            mid = await asyncio.to_thread(whoami, port, server, None)
            assert mid.server_cert.serial_number == old
            (server / certs.CERT).write_bytes((staged / certs.CERT).read_bytes())
            await asyncio.sleep(ROTATION_WAIT_S)
            done = await asyncio.to_thread(whoami, port, server, None)
            assert done.server_cert.serial_number == new

    arun(body())
