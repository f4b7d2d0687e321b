"""Mutual TLS from a directory, rotated without a restart, and where plaintext may listen.

Spec (``tessera.security.tls``): a TLS directory is checked at start (every
file there, the key matching the certificate, a Tessera identity in it);
servers pick up a re-issued certificate at the next handshake and clients at
their next channel, once the files changed (looked at once a second at most); a
half-written rotation (new key, old certificate) is never used; an identity
change is refused; clients check the server's certificate names the server they
meant; plaintext listens on loopback only, unless ``--insecure``.

Every server here is a real ``grpc.aio`` server on ``127.0.0.1`` port 0 with
real certificates; :func:`~.pki.peer_certificate` reads the certificate a server
presents to a fresh connection with the ``ssl`` module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera.security import certs
from tessera.security.identity import SCHEDULER_DNS_NAME, Identity, Role, agent_dns_name
from tessera.security.tls import (
    RESERVED_FILES,
    ChannelCache,
    TlsConfigError,
    TlsDir,
    channel_limit,
    channel_options,
    check_listen,
    is_loopback,
    sync_channel,
)

from ..conftest import Runner
from .pki import Pki, load_cert, peer_certificate, serving

#: Longer than the once-a-second look at the files.
ROTATION_WAIT_S = 1.3

SERVING = health_pb2.HealthCheckResponse.SERVING

#: No subchannel shared between channels: each test channel makes its own connection.
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def add_health(server: grpc.aio.Server) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


async def check_health(address: str, credentials: grpc.ChannelCredentials, name: str) -> Any:
    """One Health/Check on a new connection; the status, or the RpcError's code."""
    async with grpc.aio.secure_channel(
        address, credentials, options=[*channel_options(name), *FRESH]
    ) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return reply.status


def serial_seen(address: str, client_dir: Path) -> int:
    return peer_certificate(address, client_dir, SCHEDULER_DNS_NAME).serial_number


# -- a directory that cannot be used is refused at start ------------------------------


@pytest.mark.parametrize("missing", [certs.CA_CERT, certs.CERT, certs.KEY])
def test_a_missing_file_is_refused_naming_it(pki: Pki, missing: str) -> None:
    directory = pki.issue(Role.AGENT, "dgx-07")
    (directory / missing).unlink()
    with pytest.raises(TlsConfigError, match=missing):
        TlsDir(directory)


def test_a_key_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    directory = pki.issue(Role.AGENT, "dgx-07")
    other = pki.issue(Role.AGENT, "dgx-07")
    (directory / certs.KEY).write_bytes((other / certs.KEY).read_bytes())
    with pytest.raises(TlsConfigError, match="does not match"):
        TlsDir(directory)


@pytest.mark.parametrize(
    "sans",
    [
        pytest.param([], id="no subject alternative names at all"),
        pytest.param([x509.DNSName("dgx-07.agent.tessera")], id="a DNS SAN but no URI"),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://example.org/agent/dgx-07")],
            id="a URI of another trust domain",
        ),
        pytest.param(
            [
                x509.UniformResourceIdentifier("spiffe://tessera/agent/dgx-07"),
                x509.UniformResourceIdentifier("spiffe://tessera/admin/ops"),
            ],
            id="two Tessera URIs",
        ),
    ],
)
def test_a_certificate_without_one_tessera_uri_is_refused(
    pki: Pki, sans: list[x509.GeneralName]
) -> None:
    directory = pki.custom(sans)
    with pytest.raises(TlsConfigError, match=certs.CERT):
        TlsDir(directory)


@pytest.mark.parametrize("garbled", [certs.CA_CERT, certs.CERT, certs.KEY])
def test_a_file_that_is_not_pem_is_refused(pki: Pki, garbled: str) -> None:
    directory = pki.issue(Role.AGENT, "dgx-07")
    (directory / garbled).write_bytes(b"-----BEGIN NOTHING-----\n")
    with pytest.raises(TlsConfigError):
        TlsDir(directory)


def test_a_usable_directory_names_its_identity(pki: Pki) -> None:
    assert TlsDir(pki.issue(Role.AGENT, "dgx-07")).identity == Identity(Role.AGENT, "dgx-07")


def test_an_expired_certificate_is_loaded_with_a_warning(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    directory = pki.issue(Role.AGENT, "dgx-07", not_before=start, days=1)
    with caplog.at_level(logging.WARNING):
        TlsDir(directory)
    assert any("expired" in r.getMessage() for r in caplog.records)


# -- rotation, as TlsDir sees it -------------------------------------------------------


def test_a_reissued_pair_is_picked_up_about_a_second_later(pki: Pki) -> None:
    directory = pki.issue(Role.AGENT, "dgx-07")
    tls = TlsDir(directory)
    first = tls.material()
    pki.issue(Role.AGENT, "dgx-07", out=directory)
    assert tls.material() is first  # not looked at yet: at most once a second
    time.sleep(ROTATION_WAIT_S)
    fresh = tls.material()
    assert fresh.cert == (directory / certs.CERT).read_bytes() != first.cert
    assert tls.generation == 1


def test_a_broken_rotation_keeps_the_pair_in_use(pki: Pki) -> None:
    directory = pki.issue(Role.AGENT, "dgx-07")
    tls = TlsDir(directory)
    first = tls.material()
    (directory / certs.CERT).write_bytes(b"half a file")
    time.sleep(ROTATION_WAIT_S)
    assert tls.material() == first
    assert tls.generation == 0


# -- rotation without restart: a real server ------------------------------------------


def test_a_server_serves_a_reissued_certificate_to_new_connections_without_restart(
    pki: Pki, arun: Runner
) -> None:
    server_dir = pki.issue(Role.SCHEDULER, "sched-1")
    client = TlsDir(pki.issue(Role.TENANT, "acme"))
    tls = TlsDir(server_dir)

    async def body() -> None:
        async with serving(add_health, tls.server_credentials()) as address:
            old = load_cert(server_dir).serial_number
            assert await asyncio.to_thread(serial_seen, address, client.directory) == old
            creds = client.channel_credentials()
            assert await check_health(address, creds, SCHEDULER_DNS_NAME) == SERVING

            pki.issue(Role.SCHEDULER, "sched-1", out=server_dir)
            new = load_cert(server_dir).serial_number
            assert new != old
            await asyncio.sleep(ROTATION_WAIT_S)

            assert await asyncio.to_thread(serial_seen, address, client.directory) == new
            assert await check_health(address, creds, SCHEDULER_DNS_NAME) == SERVING

    arun(body())


def test_a_server_rotated_to_a_new_ca_refuses_clients_of_the_old_one(
    pki: Pki, arun: Runner
) -> None:
    server_dir = pki.issue(Role.SCHEDULER, "sched-1")
    old_client = TlsDir(pki.issue(Role.TENANT, "acme")).channel_credentials()
    tls = TlsDir(server_dir)
    new_ca = Pki(pki.root / "new-pki")

    async def body() -> None:
        async with serving(add_health, tls.server_credentials()) as address:
            assert await check_health(address, old_client, SCHEDULER_DNS_NAME) == SERVING
            new_ca.issue(Role.SCHEDULER, "sched-1", out=server_dir)
            new_client = TlsDir(new_ca.issue(Role.TENANT, "acme")).channel_credentials()
            await asyncio.sleep(ROTATION_WAIT_S)
            assert await check_health(address, new_client, SCHEDULER_DNS_NAME) == SERVING
            assert (
                await check_health(address, old_client, SCHEDULER_DNS_NAME)
                == grpc.StatusCode.UNAVAILABLE
            )

    arun(body())


def test_a_half_written_rotation_keeps_the_old_pair_in_use(pki: Pki, arun: Runner) -> None:
    server_dir = pki.issue(Role.SCHEDULER, "sched-1")
    client = TlsDir(pki.issue(Role.TENANT, "acme"))
    tls = TlsDir(server_dir)
    staged = pki.issue(Role.SCHEDULER, "sched-1")  # the pair being rolled out

    async def body() -> None:
        async with serving(add_health, tls.server_credentials()) as address:
            old = load_cert(server_dir).serial_number
            creds = client.channel_credentials()

            # The new key lands first; the old certificate is still there.
            certs.write_private(server_dir / certs.KEY, (staged / certs.KEY).read_bytes())
            await asyncio.sleep(ROTATION_WAIT_S)
            assert await asyncio.to_thread(serial_seen, address, client.directory) == old
            assert await check_health(address, creds, SCHEDULER_DNS_NAME) == SERVING

            # Then the certificate: now the new pair is complete, and served.
            certs.write_private(
                server_dir / certs.CERT, (staged / certs.CERT).read_bytes(), mode=0o644
            )
            await asyncio.sleep(ROTATION_WAIT_S)
            assert (
                await asyncio.to_thread(serial_seen, address, client.directory)
                == load_cert(staged).serial_number
            )
            assert await check_health(address, creds, SCHEDULER_DNS_NAME) == SERVING

    arun(body())


def test_files_that_name_another_identity_are_refused_and_the_old_kept(
    pki: Pki, arun: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    server_dir = pki.issue(Role.SCHEDULER, "sched-1")
    client = TlsDir(pki.issue(Role.TENANT, "acme"))
    tls = TlsDir(server_dir)

    async def body() -> None:
        async with serving(add_health, tls.server_credentials()) as address:
            old = load_cert(server_dir).serial_number
            pki.issue(Role.ADMIN, "ops", out=server_dir)
            await asyncio.sleep(ROTATION_WAIT_S)
            assert await asyncio.to_thread(serial_seen, address, client.directory) == old
            assert (
                await check_health(address, client.channel_credentials(), SCHEDULER_DNS_NAME)
                == SERVING
            )

    with caplog.at_level(logging.WARNING):
        arun(body())
    assert tls.identity == Identity(Role.SCHEDULER, "sched-1")
    assert tls.generation == 0
    assert any("keeping the old identity" in r.getMessage() for r in caplog.records)


# -- clients check whom they reached --------------------------------------------------


def test_a_client_refuses_a_server_that_is_not_the_one_it_meant(pki: Pki, arun: Runner) -> None:
    agent_tls = TlsDir(pki.issue(Role.AGENT, "dgx-08"))
    scheduler = TlsDir(pki.issue(Role.SCHEDULER, "sched-1"))
    cache = ChannelCache(scheduler)

    async def call(channel: grpc.aio.Channel) -> Any:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return reply.status

    async def body() -> None:
        async with serving(add_health, agent_tls.server_credentials()) as address:
            assert await call(cache.get(address, agent_dns_name("dgx-08"))) == SERVING
            # The scheduler meant dgx-07's agent: dgx-08's certificate does not do.
            assert (
                await call(cache.get(address, agent_dns_name("dgx-07")))
                == grpc.StatusCode.UNAVAILABLE
            )
            assert await call(cache.get(address, SCHEDULER_DNS_NAME)) == grpc.StatusCode.UNAVAILABLE
        await cache.close()

    arun(body())


def test_a_blocking_channel_checks_the_server_name_too(pki: Pki, arun: Runner) -> None:
    server = TlsDir(pki.issue(Role.SCHEDULER, "sched-1"))
    client = TlsDir(pki.issue(Role.ADMIN, "ops"))

    def check(address: str, name: str) -> Any:
        with sync_channel(address, client, name) as channel:
            try:
                return (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=5)
                    .status
                )
            except grpc.RpcError as err:
                return err.code()

    async def body() -> None:
        async with serving(add_health, server.server_credentials()) as address:
            assert await asyncio.to_thread(check, address, SCHEDULER_DNS_NAME) == SERVING
            assert (
                await asyncio.to_thread(check, address, agent_dns_name("sched-1"))
                == grpc.StatusCode.UNAVAILABLE
            )

    arun(body())


# -- ChannelCache ----------------------------------------------------------------------


def add_caller_serial(server: grpc.aio.Server) -> None:
    """A method answering the serial number of the caller's certificate (test scaffolding)."""

    async def caller_serial(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        pem = next(iter(context.auth_context()["x509_pem_cert"]))
        return str(x509.load_pem_x509_certificate(pem).serial_number).encode()

    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Caller", {"Serial": grpc.unary_unary_rpc_method_handler(caller_serial)}
            )
        ]
    )


async def caller_serial_seen(channel: grpc.aio.Channel) -> int:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/test.Caller/Serial"
    )
    reply = await method(b"", timeout=5)
    assert isinstance(reply, bytes)
    return int(reply)


def test_the_channel_cache_keeps_a_channel_until_the_files_change(pki: Pki, arun: Runner) -> None:
    server = TlsDir(pki.issue(Role.SCHEDULER, "sched-1"))
    client_dir = pki.issue(Role.AGENT, "dgx-07")
    cache = ChannelCache(TlsDir(client_dir))

    async def body() -> None:
        async with serving(add_caller_serial, server.server_credentials()) as address:
            first = cache.get(address, SCHEDULER_DNS_NAME)
            assert cache.get(address, SCHEDULER_DNS_NAME) is first
            assert cache.get(address, "other.scheduler.tessera") is not first
            assert await caller_serial_seen(first) == load_cert(client_dir).serial_number

            pki.issue(Role.AGENT, "dgx-07", out=client_dir)
            await asyncio.sleep(ROTATION_WAIT_S)

            second = cache.get(address, SCHEDULER_DNS_NAME)
            assert second is not first
            assert cache.get(address, SCHEDULER_DNS_NAME) is second
            assert await caller_serial_seen(second) == load_cert(client_dir).serial_number
            # Calls in flight may finish on the retired channel: it stays open.
            assert await caller_serial_seen(first) != load_cert(client_dir).serial_number
        await cache.close()

    arun(body())


def test_a_plaintext_channel_cache_keeps_one_channel_per_address(arun: Runner) -> None:
    cache = ChannelCache(None)

    async def body() -> None:
        channel = cache.get("127.0.0.1:1", SCHEDULER_DNS_NAME)
        assert cache.get("127.0.0.1:1", SCHEDULER_DNS_NAME) is channel
        assert cache.get("127.0.0.1:2", SCHEDULER_DNS_NAME) is not channel
        await cache.close()

    arun(body())


def test_the_channel_cache_keeps_a_bounded_number_of_channels(arun: Runner) -> None:
    # Agents choose the addresses: one re-registering at new ports must not
    # grow the scheduler's channels for ever.
    cache = ChannelCache(None, limit=2)

    async def body() -> None:
        first = cache.get("127.0.0.1:1", SCHEDULER_DNS_NAME)
        second = cache.get("127.0.0.1:2", SCHEDULER_DNS_NAME)
        assert cache.get("127.0.0.1:1", SCHEDULER_DNS_NAME) is first  # now the newest
        for port in range(3, 10):
            cache.get(f"127.0.0.1:{port}", SCHEDULER_DNS_NAME)
        assert cache.get("127.0.0.1:2", SCHEDULER_DNS_NAME) is not second
        await asyncio.sleep(0)  # let the background closes run
        await cache.close()

    arun(body())


def test_a_channel_evicted_or_replaced_is_closed_once_its_grace_has_passed(arun: Runner) -> None:
    """Evicted channels are not kept open for ever: each may hold an agent's connection."""

    async def body() -> None:
        patient = ChannelCache(None, limit=2, retire_after_s=3600)
        prompt = ChannelCache(None, limit=2, retire_after_s=0)
        for cache in (patient, prompt):
            for port in range(1, 8):
                cache.get(f"127.0.0.1:{port}", SCHEDULER_DNS_NAME)
        # Within their grace, retired channels wait for calls in flight (at
        # most as many as the limit); past it they are closed.
        assert patient.open_channels == 4
        assert prompt.open_channels == 2
        await asyncio.sleep(0)  # let the background closes run
        await patient.close()
        await prompt.close()
        assert patient.open_channels == prompt.open_channels == 0

    arun(body())


class _SlowHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Answers SERVING after a while: a call still in flight when its channel goes."""

    async def Check(  # noqa: N802 - gRPC method names are CamelCase
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthCheckResponse:
        await asyncio.sleep(0.5)
        return health_pb2.HealthCheckResponse(status=SERVING)


def test_a_call_in_flight_finishes_on_a_channel_retired_beyond_the_limit(arun: Runner) -> None:
    """Eviction past the limit closes a channel at once, with a grace: its calls
    end as they would have, never cancelled."""

    def add_slow(server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(_SlowHealth(), server)

    async def body() -> None:
        cache = ChannelCache(None, limit=1, retire_after_s=3600)
        async with serving(add_slow, None) as address:
            channel = cache.get(address, "a")
            call = asyncio.ensure_future(
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            )
            await asyncio.sleep(0.1)  # the call is in flight
            for name in ("b", "c", "d"):
                cache.get(address, name)
            assert cache.open_channels == 2  # one kept, one retired: the first is closing
            reply = await call
            assert reply.status == SERVING
            await cache.close()

    arun(body())


def test_the_channel_limit_follows_the_open_files_allowed() -> None:
    assert channel_limit(1024) == 64  # a common default soft limit: the floor
    assert channel_limit(20_000) == (20_000 - RESERVED_FILES) // 3
    assert channel_limit(1 << 20) == 65_536


# -- where plaintext may listen ---------------------------------------------------------

LISTEN: dict[str, tuple[str, bool, str]] = {
    # name: (listen, --insecure, outcome: "ok" | "warn" | "refused" | "insecure")
    "IPv4 loopback: allowed with a warning": ("127.0.0.1:50051", False, "warn"),
    "another 127/8 address: allowed with a warning": ("127.0.0.2:50051", False, "warn"),
    "localhost: allowed with a warning": ("localhost:50051", False, "warn"),
    "IPv6 loopback [::1]:0: allowed with a warning": ("[::1]:0", False, "warn"),
    "every IPv4 interface: refused without --insecure": ("0.0.0.0:50051", False, "refused"),
    "every IPv6 interface: refused without --insecure": ("[::]:50051", False, "refused"),
    "no host (every interface): refused without --insecure": (":50051", False, "refused"),
    "a LAN address: refused without --insecure": ("10.0.0.7:50051", False, "refused"),
    "a host name: refused without --insecure": ("sched.example.org:50051", False, "refused"),
    "a name that only starts like localhost: refused": ("localhost.evil.org:1", False, "refused"),
    "every interface with --insecure: allowed, warning it is insecure": (
        "0.0.0.0:50051",
        True,
        "insecure",
    ),
    "loopback with --insecure: still the loopback warning": ("127.0.0.1:0", True, "warn"),
}


@pytest.mark.parametrize(
    ("listen", "insecure", "outcome"), [pytest.param(*v, id=k) for k, v in LISTEN.items()]
)
def test_plaintext_listens_on_loopback_only_unless_insecure(
    listen: str, insecure: bool, outcome: str
) -> None:
    if outcome == "refused":
        with pytest.raises(TlsConfigError, match="--insecure"):
            check_listen(listen, None, insecure, "tessera-scheduler")
        return
    warning = check_listen(listen, None, insecure, "tessera-scheduler")
    assert warning is not None
    assert warning.startswith("tessera-scheduler")
    assert ("INSECURE" in warning) is (outcome == "insecure")
    assert is_loopback(listen) is (outcome == "warn")


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "127.0.0.1:0", "[::]:1"])
def test_with_tls_any_address_is_fine_and_nothing_to_warn(pki: Pki, listen: str) -> None:
    tls = TlsDir(pki.issue(Role.SCHEDULER, "sched-1"))
    assert check_listen(listen, tls, False, "tessera-scheduler") is None
