"""Mutual TLS from a directory: ``ca.pem``, ``cert.pem``, ``key.pem``, reloaded when they change.

Every Tessera process takes ``--tls-dir DIR`` (``TESSERA_TLS_DIR``). Servers
require a client certificate signed by the CA and read the caller's identity
from it; clients check the server's certificate names the identity they meant
(``scheduler.tessera``, or ``<host>.agent.tessera`` for one host's agent).

Rotation without restart: servers get their certificate through gRPC's dynamic
credentials, asked again at each new handshake; clients rebuild their channels
when the files change. A half-written rotation (a new certificate with the old
key) is never used: the pair is checked before it replaces the one in use.

Without a TLS directory a process serves plaintext, which :func:`check_listen`
allows on loopback only unless the operator passes ``--insecure``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.keepalive import KEEPALIVE, Keepalive
from tessera.security.certs import CA_CERT, CERT, KEY
from tessera.security.identity import Identity, IdentityError

log = logging.getLogger(__name__)

#: How often at most a client looks at the files for a rotation.
_STAT_EVERY_S = 1.0


class TlsConfigError(ValueError):
    """A TLS directory that cannot be used; the message names the file."""


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of PEM files and the identity they prove."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity
    not_after: float


def identity_of_pem(cert_pem: bytes) -> Identity:
    """The Tessera identity in a certificate's URI SAN.

    Raises:
        IdentityError: no single ``spiffe://tessera/...`` URI SAN.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subject alternative names") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    if len(uris) != 1:
        raise IdentityError(f"the certificate must carry one URI SAN, it has {len(uris)}")
    return Identity.parse(uris[0])


def _fingerprint(directory: Path) -> tuple[tuple[int, int, int], ...]:
    out = []
    for name in (CA_CERT, CERT, KEY):
        try:
            st = (directory / name).stat()
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_material(directory: Path) -> TlsMaterial:
    """Read and check a TLS directory.

    Raises:
        TlsConfigError: a file is missing or unreadable, the key does not match
            the certificate, or the certificate names no Tessera identity.
    """
    blobs: dict[str, bytes] = {}
    for name in (CA_CERT, CERT, KEY):
        try:
            blobs[name] = (directory / name).read_bytes()
        except OSError as err:
            raise TlsConfigError(f"--tls-dir {directory}: {name}: {err.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(blobs[CERT])
        x509.load_pem_x509_certificates(blobs[CA_CERT])
        key = serialization.load_pem_private_key(blobs[KEY], password=None)
    except ValueError as err:
        raise TlsConfigError(f"--tls-dir {directory}: unreadable PEM ({err})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TlsConfigError(f"--tls-dir {directory}: {KEY} does not match {CERT}")
    try:
        identity = identity_of_pem(blobs[CERT])
    except IdentityError as err:
        raise TlsConfigError(f"--tls-dir {directory}: {CERT}: {err}") from None
    return TlsMaterial(
        ca=blobs[CA_CERT],
        cert=blobs[CERT],
        key=blobs[KEY],
        identity=identity,
        not_after=cert.not_valid_after_utc.timestamp(),
    )


class TlsDir:
    """A process's TLS directory, reloaded when its files change.

    Args:
        directory: holds ``ca.pem``, ``cert.pem`` and ``key.pem``.

    Raises:
        TlsConfigError: the files cannot be used now (checked at start, so a
            process refuses to start on a bad directory).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._material = load_material(directory)
        self._seen = _fingerprint(directory)
        self._checked = time.monotonic()
        self.generation = 0
        if self._material.not_after < time.time():
            log.warning("%s: the certificate has expired; peers will refuse it", directory)

    @property
    def identity(self) -> Identity:
        """Who this process is."""
        return self._material.identity

    def material(self) -> TlsMaterial:
        """The files in use, reloaded first if they changed (at most once a second)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < _STAT_EVERY_S:
                return self._material
            self._checked = now
            seen = _fingerprint(self.directory)
            if seen == self._seen:
                return self._material
            try:
                fresh = load_material(self.directory)
            except TlsConfigError as err:
                # Mid-rotation, or a broken one: keep serving with what works.
                log.warning("TLS files changed but cannot be used yet (%s); keeping the old", err)
                return self._material
            if fresh.identity != self._material.identity:
                log.warning(
                    "TLS files now name %s, not %s; keeping the old identity",
                    fresh.identity,
                    self._material.identity,
                )
                self._seen = seen
                return self._material
            self._seen = seen
            self._material = fresh
            self.generation += 1
            log.info("reloaded TLS files from %s (rotation %d)", self.directory, self.generation)
            return fresh

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate from the CA, rotating."""
        first = self.material()

        def config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], m.ca)

        served = [first.ca, first.cert, first.key]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Asked by gRPC at every new handshake: None keeps the current one.
            m = self.material()
            if [m.ca, m.cert, m.key] == served:
                return None
            served[:] = [m.ca, m.cert, m.key]
            return config(m)

        return grpc.dynamic_ssl_server_credentials(
            config(first),
            fetch,  # type: ignore[arg-type]  # gRPC documents None as "unchanged"
            require_client_authentication=True,
        )

    def http_server_context(self) -> ssl.SSLContext:
        """A TLS context for an HTTPS server: this identity, rotating, client certificates asked.

        A client certificate is asked for but not required: a browser
        without one, or a kubelet's probe, may still reach ``/healthz``;
        everything else is refused without an identity from the CA (the
        server reads it from the connection). Each handshake looks at the
        files first (at most once a second) and, once they changed, is
        served from a context loaded from the new ones, as gRPC's dynamic
        credentials do.
        """
        served = [self.material()]
        current = [self._http_context(served[0])]

        def rotate(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            material = self.material()
            if material is not served[0]:
                try:
                    current[0] = self._http_context(material)
                except (ssl.SSLError, OSError) as err:
                    # Files changed again since they were checked: keep the old.
                    log.warning(
                        "TLS files cannot be loaded for HTTPS yet (%s); keeping the old", err
                    )
                served[0] = material
            if sock.context is not current[0]:
                sock.context = current[0]

        first = current[0]
        first.sni_callback = rotate
        return first

    def _http_context(self, material: TlsMaterial) -> ssl.SSLContext:
        """An HTTPS server context for ``material`` (cert and key read from the directory)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.directory / CERT, self.directory / KEY)
        ctx.load_verify_locations(cadata=material.ca.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: this identity's certificate, the CA to check servers."""
        m = self.material()
        return grpc.ssl_channel_credentials(m.ca, m.key, m.cert)


def channel_options(server_name: str) -> list[tuple[str, str]]:
    """Options that make the client verify ``server_name`` in the server's certificate."""
    return [("grpc.ssl_target_name_override", server_name)]


class ChannelCache:
    """Asyncio channels by address, rebuilt when the TLS files rotate.

    A scheduler keeps one channel to each agent it talks to: a channel
    dropped and made again costs a TLS handshake on both sides (a few ms of
    CPU), and the reconciler talks to every host every few minutes. So the
    limit must exceed the fleet (see :func:`channel_limit`); a channel left
    idle gives its connection up by itself (gRPC's idle timeout, 30 min),
    and one whose peer fell silent is dropped by keepalive pings (see
    :mod:`tessera.keepalive`).

    Args:
        tls: the process's TLS directory; None for plaintext (development).
        limit: channels kept at most; the least recently used beyond it are
            retired (agents choose their addresses: a host re-registering at
            ever new ports must not grow this for ever).
        retire_after_s: a retired channel (evicted, or of TLS files since
            rotated) is closed this long after, when calls still in flight
            on it have ended: longer than any agent call's deadline.
        keepalive: how idle connections are checked (see
            :mod:`tessera.keepalive`); None: never (a dead peer is found
            by the next call's deadline).
    """

    def __init__(
        self,
        tls: TlsDir | None,
        limit: int = 4096,
        retire_after_s: float = 120.0,
        keepalive: Keepalive | None = KEEPALIVE,
    ) -> None:
        self._tls = tls
        self._options = keepalive.channel_options() if keepalive is not None else []
        self._limit = limit
        self._retire_after_s = retire_after_s
        self._channels: dict[tuple[str, str], tuple[int, grpc.aio.Channel]] = {}
        # (when retired, monotonic s; channel), oldest first.
        self._retired: list[tuple[float, grpc.aio.Channel]] = []
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str, server_name: str) -> grpc.aio.Channel:
        """A channel to ``address`` whose server must be ``server_name``.

        Args:
            address: host:port.
            server_name: the DNS SAN the server's certificate must carry
                (ignored in plaintext).
        """
        key = (address, server_name)
        generation = -1
        if self._tls is not None:
            self._tls.material()
            generation = self._tls.generation
        cached = self._channels.pop(key, None)
        if cached is not None and cached[0] == generation:
            self._channels[key] = cached  # most recently used last
            self._close_retired()
            return cached[1]
        if cached is not None:
            # Calls in flight finish on the old channel; it closes later.
            self._retire(cached[1])
        if self._tls is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
        else:
            channel = grpc.aio.secure_channel(
                address,
                self._tls.channel_credentials(),
                options=[*channel_options(server_name), *self._options],
            )
        self._channels[key] = (generation, channel)
        while len(self._channels) > self._limit:
            oldest = next(iter(self._channels))
            self._retire(self._channels.pop(oldest)[1])
        self._close_retired()
        return channel

    @property
    def limit(self) -> int:
        """Channels kept at most."""
        return self._limit

    @property
    def open_channels(self) -> int:
        """Channels kept or retired and not closed yet (each may hold a connection)."""
        return len(self._channels) + len(self._retired)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Keep ``channel`` for calls in flight; it is closed once they must have ended."""
        self._retired.append((time.monotonic(), channel))

    def _close_retired(self) -> None:
        """Close retired channels past their grace; beyond the limit, the oldest at once.

        One closed at once, before its grace is over, still lets the calls in
        flight on it finish (gRPC's close with a grace): they are never
        cancelled, only new ones refused, and there are none.
        """
        now = time.monotonic()
        while self._retired and (
            self._retired[0][0] + self._retire_after_s <= now or len(self._retired) > self._limit
        ):
            retired_at, stale = self._retired.pop(0)
            grace = max(0.0, retired_at + self._retire_after_s - now)
            # Nothing awaits it: closing is best effort, in the background.
            task = asyncio.get_running_loop().create_task(stale.close(grace or None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel, all at once (a replica may hold tens of thousands)."""
        channels = [c for _, c in self._channels.values()] + [c for _, c in self._retired]
        await asyncio.gather(*(channel.close() for channel in channels))
        self._channels.clear()
        self._retired.clear()


#: File descriptors a process keeps apart from its agent channels: the
#: listening socket, clients' connections, Redis, logs, the embedded Valkey.
RESERVED_FILES = 1024


def channel_limit(open_files: int) -> int:
    """How many agent channels a process allowed ``open_files`` descriptors may keep.

    Per agent a scheduler may hold three connections: the channel it keeps,
    one retired (the TLS files rotated, calls may still be in flight), and
    the agent's own to it (registration, heartbeats). So a third of what is
    left after :data:`RESERVED_FILES`, at least 64 and at most 65,536.
    """
    return max(64, min(65_536, (open_files - RESERVED_FILES) // 3))


def sync_channel(address: str, tls: TlsDir | None, server_name: str) -> grpc.Channel:
    """A blocking channel (CLI, tests): TLS when ``tls`` is given."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(
        address, tls.channel_credentials(), options=channel_options(server_name)
    )


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` listen address is reachable from this machine only."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, tls: TlsDir | None, insecure: bool, program: str) -> str | None:
    """Whether a process may serve on ``listen``; the warning to log, if any.

    Raises:
        TlsConfigError: plaintext on a non-loopback address without ``--insecure``.
    """
    if tls is not None:
        return None
    if is_loopback(listen):
        return (
            f"{program}: no --tls-dir: serving plaintext on loopback {listen}; every local "
            "caller is trusted with every role (development only)"
        )
    if not insecure:
        raise TlsConfigError(
            f"--listen {listen}: serving plaintext beyond loopback needs --tls-dir "
            "(mutual TLS), or --insecure to accept that anyone on the network can call"
        )
    return (
        f"{program}: INSECURE: serving plaintext on {listen} without authentication; anyone "
        "who reaches it can act as any tenant, agent or scheduler"
    )
