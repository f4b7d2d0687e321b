"""A replica opens its connections to the live hosts' agents before a Place needs them.

Each test serves a real gRPC server on loopback (plaintext: the handshake
under test is gRPC's, whatever the credentials) and warms real channels
through the scheduler's gateway and channel cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tessera.scheduler.service.agent_connections import AgentConnections, WarmSettings
from tessera.scheduler.service.agent_gateway import GrpcAgentGateway
from tessera.scheduler.store.redis_store import HostRecord
from tessera.security.tls import ChannelCache

from ...conftest import Runner


def host(
    host_id: str, address: str, *, cordoned: bool = False, expired: bool = False
) -> HostRecord:
    """A registered host whose agent listens at ``address``."""
    return HostRecord(
        host_id=host_id,
        inventory=b"",
        agent_address=address,
        boot_id="boot-1",
        inventory_generation=1,
        last_heartbeat_ms=1,
        alloc_generation=1,
        cordoned=cordoned,
        lease_expired=expired,
    )


#: Where nothing listens: channels there only try.
NOBODY = "127.0.0.1:1"


async def _agent_server() -> tuple[grpc.aio.Server, str]:
    """A gRPC server on loopback standing in for the agents' listening socket."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def agents(limit: int = 4096) -> AsyncIterator[tuple[GrpcAgentGateway, ChannelCache, str]]:
    """The scheduler's gateway over a cache of ``limit`` channels, and an agent's address."""
    server, address = await _agent_server()
    cache = ChannelCache(None, limit=limit)
    gateway = GrpcAgentGateway(cache)
    try:
        yield gateway, cache, address
    finally:
        await gateway.close()
        await server.stop(None)


async def _ready(gateway: GrpcAgentGateway, address: str, host_id: str) -> None:
    """Wait until the channel to ``host_id`` is connected (never asks it to connect)."""
    channel = gateway._channel(address, host_id)  # the gateway's own channel, as a Place gets it
    async with asyncio.timeout(10):
        while (state := channel.get_state()) is not grpc.ChannelConnectivity.READY:
            await channel.wait_for_state_change(state)


def _records(*hosts: HostRecord) -> Callable[[], Awaitable[Mapping[str, HostRecord]]]:
    """The live model's records, as the replica's refreshed snapshot hands them over."""

    async def records() -> Mapping[str, HostRecord]:
        return {h.host_id: h for h in hosts}

    return records


def test_live_hosts_are_connected_before_any_call_and_left_connected(arun: Runner) -> None:
    async def body() -> None:
        async with agents() as (gateway, cache, address):
            warmer = AgentConnections(
                _records(
                    host("h1", address),
                    host("h2", address, cordoned=True),
                    host("h3", address, expired=True),
                ),
                gateway,
            )
            first = await warmer.round()
            assert (first.hosts, first.asked, first.connected, first.skipped) == (1, 1, 0, 0)
            await _ready(gateway, address, "h1")
            # Cordoned and expired hosts get no Place: no channel was made for them.
            assert cache.open_channels == 1
            again = await warmer.round()
            assert (again.asked, again.connected) == (0, 1)

    arun(body())


def test_past_the_budget_hosts_holding_placements_come_next(arun: Runner) -> None:
    # Best fit fills a host before it opens an empty one: of two hosts in
    # this replica's share, the one holding a placement is warmed first.
    async def body() -> None:
        async with agents(limit=2) as (gateway, _, address):  # a budget of one host
            busy = replace(host("h2", address), allocations={"iommu-group:1": "pl-1"})
            warmer = AgentConnections(_records(host("h1", address), busy), gateway)
            assert warmer.budget == 1
            done = await warmer.round()
            assert (done.asked, done.skipped) == (1, 1)
            await _ready(gateway, address, "h2")

    arun(body())


def test_past_the_budget_the_replicas_own_share_is_warmed_first(arun: Runner) -> None:
    async def body() -> None:
        # Three channels kept at most: two warmed, one left to other hosts.
        async with agents(limit=3) as (gateway, cache, address):
            warmer = AgentConnections(
                _records(*(host(f"h{i}", address) for i in range(1, 5))),
                gateway,
                prefer=lambda host_id: host_id in {"h3", "h4"},
            )
            assert warmer.budget == 2
            done = await warmer.round()
            assert (done.hosts, done.asked, done.skipped) == (4, 2, 2)
            assert cache.open_channels == 2
            await _ready(gateway, address, "h3")
            await _ready(gateway, address, "h4")

    arun(body())


def test_connections_are_asked_for_in_paced_bursts(arun: Runner) -> None:
    # 20 a second: bursts of 2, a tenth of a second apart.
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        async with agents() as (gateway, _, _):
            warmer = AgentConnections(
                # Nothing listens on port 1: the channels only try.
                _records(*(host(f"h{i}", NOBODY) for i in range(5))),
                gateway,
                settings=WarmSettings(rate_per_s=20),
                sleep=sleep,
            )
            done = await warmer.round()
            assert done.asked == 5
            assert slept == [0.1, 0.1]

    arun(body())


def test_a_host_that_names_no_agent_is_passed_over(arun: Runner) -> None:
    # A plaintext scheduler accepts host ids like "rack/7": no channel can
    # name its agent, and the round goes on to the next host.
    async def body() -> None:
        async with agents() as (gateway, _, address):
            warmer = AgentConnections(
                _records(host("rack/7", address), host("h1", address)), gateway
            )
            done = await warmer.round()
            assert (done.unreachable, done.asked) == (1, 1)

    arun(body())


def test_a_store_that_does_not_answer_costs_a_round_not_the_warmer(arun: Runner) -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    async def records() -> Mapping[str, HostRecord]:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RedisConnectionError("store down")
        stop.set()
        return {}

    async def body() -> None:
        async with agents() as (gateway, _, _):
            warmer = AgentConnections(records, gateway, settings=WarmSettings(interval_s=0.01))
            await asyncio.wait_for(warmer.run(stop), 10)

    arun(body())
    assert calls == [0, 1]


def test_settings_that_would_never_warm_or_spin_are_refused() -> None:
    for bad in ({"interval_s": 0}, {"rate_per_s": -1}):
        with pytest.raises(ValueError, match="warm settings"):
            WarmSettings(**bad)


def test_stopping_ends_a_round_midway(arun: Runner) -> None:
    # 2,000 hosts not connected at 200 a second: a 10 s round. A replica
    # told to stop must not wait for it (the scheduler stops serving after).
    stop = asyncio.Event()

    async def body() -> float:
        async with agents() as (gateway, _, _):
            warmer = AgentConnections(
                _records(*(host(f"h{i}", NOBODY) for i in range(2_000))), gateway
            )
            task = asyncio.create_task(warmer.run(stop))
            await asyncio.sleep(0.3)
            assert not task.done()
            stop.set()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(task, 15)
            return loop.time() - t0

    assert arun(body()) < 1.0


def test_a_rate_under_ten_a_second_is_honoured(arun: Runner) -> None:
    # Two a second: six connections spread over three seconds.
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        async with agents() as (gateway, _, _):
            await AgentConnections(
                _records(*(host(f"h{i}", NOBODY) for i in range(6))),
                gateway,
                settings=WarmSettings(rate_per_s=2),
                sleep=sleep,
            ).round()

    arun(body())
    assert sum(slept) == pytest.approx(3.0)


def test_rounds_never_evict_a_channel_in_use_outside_the_budget(arun: Runner) -> None:
    # A drain's channel to a cordoned host, on a cache of four: rounds over
    # nine live hosts warm three and leave the fourth channel alone.
    async def body() -> None:
        async with agents(limit=4) as (gateway, cache, address):
            draining = gateway._channel(address, "cordoned")
            warmer = AgentConnections(
                _records(*(host(f"h{i}", address) for i in range(1, 10))), gateway
            )
            for _ in range(3):
                done = await warmer.round()
                assert (done.hosts, done.skipped) == (9, 6)
            assert gateway._channel(address, "cordoned") is draining
            assert cache.open_channels == 4  # nothing retired: no thrash

    arun(body())


def test_a_host_that_moved_is_warmed_at_its_new_address(arun: Runner) -> None:
    async def body() -> None:
        new_server, new = await _agent_server()
        try:
            async with agents() as (gateway, _, old):
                await AgentConnections(_records(host("h1", old)), gateway).round()
                await _ready(gateway, old, "h1")
                done = await AgentConnections(_records(host("h1", new)), gateway).round()
                assert (done.asked, done.connected) == (1, 0)
                await _ready(gateway, new, "h1")
        finally:
            await new_server.stop(None)

    arun(body())


def test_an_agent_that_is_down_is_counted_failing(arun: Runner) -> None:
    # Nothing listens on port 1: the first round asks, gRPC's try fails, and
    # the next round finds the channel failing (it keeps retrying itself).
    async def body() -> None:
        async with agents() as (gateway, _, _):
            warmer = AgentConnections(_records(host("h1", NOBODY)), gateway)
            first = await warmer.round()
            assert (first.asked, first.failing) == (1, 0)
            channel = gateway._channel(NOBODY, "h1")
            async with asyncio.timeout(10):
                while channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    await channel.wait_for_state_change(channel.get_state())
            again = await warmer.round()
            assert (again.asked, again.failing, again.connected) == (1, 1, 0)

    arun(body())
