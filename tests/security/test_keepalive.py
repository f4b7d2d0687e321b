"""Keepalive: a connection whose peer went silent is dropped, an idle one is kept.

Spec (``tessera.keepalive``): every channel Tessera's processes keep
(:class:`~tessera.security.tls.ChannelCache`) pings its peer after
``time_s`` without traffic, calls in flight or not, and drops the
connection when a ping goes unanswered for ``timeout_s``; servers built with
the same settings accept those pings, so an idle channel keeps its one
connection.

A peer gone silent is played by :class:`SilentLink`, a TCP relay between the
channel and a real ``grpc.aio`` server that, once told, swallows every byte
without closing anything: what a dropped NAT entry or a vanished host looks
like to the client. Settings are scaled down to fractions of a second; the
waits are deadlines for a state change, not timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera.keepalive import KEEPALIVE, Keepalive
from tessera.security.identity import Role, agent_dns_name
from tessera.security.tls import ChannelCache, TlsDir

from ..conftest import Runner
from .pki import Pki, serving

#: Scaled-down settings: a ping after half a second idle, half a second to answer.
QUICK = Keepalive(time_s=0.5, timeout_s=0.5)

#: How long a channel may take to notice a silent peer: several rounds of QUICK.
NOTICE_S = 10.0

#: Idle time over which a channel must keep its connection: six QUICK pings.
IDLE_S = 3.0

READY = grpc.ChannelConnectivity.READY


class SilentLink:
    """A TCP relay to ``127.0.0.1:target`` that can fall silent without closing.

    Attributes:
        connections: connections accepted so far (a reconnect adds one).
        silent: once set, bytes either way are read and dropped, and a
            side that closes is not passed on.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self.silent = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65_536):
                if not self.silent:
                    dst.write(data)
                    await dst.drain()
        if not self.silent:
            dst.close()
        # Silent: the other side is left open, hearing nothing, for as long
        # as the relay runs (a server's keepalive closing its end is not
        # passed on, so the client must notice by itself).

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on ``127.0.0.1:0``; the address to dial."""
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        try:
            yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def add_health(server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)


async def check(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def state_after(channel: grpc.aio.Channel, seconds: float) -> grpc.ChannelConnectivity:
    """The channel's state once it left READY, or READY after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = channel.get_state()
        if state is not READY:
            return state
        await asyncio.sleep(0.05)
    return channel.get_state()


@asynccontextmanager
async def relayed(
    cache: ChannelCache,
    server_options: Sequence[tuple[str, int]],
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[tuple[grpc.aio.Channel, SilentLink]]:
    """A channel from ``cache`` to a health server behind a :class:`SilentLink`, one call made."""
    async with serving(add_health, credentials, options=server_options) as address:
        link = SilentLink(int(address.rsplit(":", 1)[1]))
        async with link.running() as through:
            channel = cache.get(through, agent_dns_name("dgx-01"))
            await check(channel)
            try:
                yield channel, link
            finally:
                await cache.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mutual-tls"])
def test_a_channel_whose_peer_fell_silent_drops_its_connection(
    tls: bool, pki: Pki, arun: Runner
) -> None:
    agent = pki.issue(Role.AGENT, "dgx-01") if tls else None
    scheduler = TlsDir(pki.issue(Role.SCHEDULER, "sched-1")) if tls else None
    cache = ChannelCache(scheduler, keepalive=QUICK)

    async def body() -> None:
        credentials = TlsDir(agent).server_credentials() if agent is not None else None
        async with relayed(cache, QUICK.server_options(), credentials) as (channel, link):
            link.silent = True
            # gRPC drops the transport; the channel goes IDLE (or tries again).
            assert await state_after(channel, NOTICE_S) is not READY

    arun(body())


def test_without_keepalive_a_silent_peer_still_reads_as_connected(arun: Runner) -> None:
    """The control: what keepalive is for. Without it the channel cannot tell."""

    async def body() -> None:
        async with relayed(ChannelCache(None, keepalive=None), ()) as (channel, link):
            link.silent = True
            assert await state_after(channel, IDLE_S) is READY

    arun(body())


def test_an_idle_channel_keeps_its_one_connection(arun: Runner) -> None:
    """Servers accept the pings of idle clients: no GOAWAY ``too_many_pings``, no reconnect."""

    async def body() -> None:
        cache = ChannelCache(None, keepalive=QUICK)
        async with relayed(cache, QUICK.server_options()) as (channel, link):
            assert await state_after(channel, IDLE_S) is READY
            await check(channel)
            assert link.connections == 1

    arun(body())


def test_a_server_without_the_agreement_sends_an_idle_pinger_away(arun: Runner) -> None:
    """Why both ends take the same settings: gRPC's default server refuses the pings."""

    async def body() -> None:
        async with relayed(ChannelCache(None, keepalive=QUICK), ()) as (channel, _):
            assert await state_after(channel, NOTICE_S) is not READY

    arun(body())


def test_the_settings_every_process_uses_check_within_a_minute_and_a_half() -> None:
    assert KEEPALIVE.time_s + KEEPALIVE.timeout_s <= 90
    client = dict(KEEPALIVE.channel_options())
    server = dict(KEEPALIVE.server_options())
    # A client's pings come no more often than its server accepts.
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )


@pytest.mark.parametrize(("time_s", "timeout_s"), [(0, 20), (60, 0), (-1, 20), (60, 1e9)])
def test_settings_out_of_range_are_refused(time_s: float, timeout_s: float) -> None:
    with pytest.raises(ValueError, match="keepalive"):
        Keepalive(time_s=time_s, timeout_s=timeout_s)
