"""A replica's snapshot reads: shared by concurrent callers, never older than the call."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tessera.scheduler.core.identity import HostId
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore

from ...conftest import Runner
from .test_housekeeping import Clock, Host, gpu, inventory


async def _host_reads(client: aioredis.Redis) -> int:
    """Scripts run by the server so far (the snapshot reads each host with one)."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_concurrent_callers_share_reads_and_each_sees_what_came_before_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        coordinator = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await coordinator.register(inventory(), "agent:1")
        await coordinator.snapshot()  # warm: the inventory parsed once
        await redis_client.config_resetstat()
        results = await asyncio.gather(*(coordinator.snapshot() for _ in range(32)))
        # One host: a read is one script call. 32 callers, at most two reads
        # (the one they found in flight, if any, is not theirs; the next is).
        assert await _host_reads(redis_client) <= 2
        assert all(snap.hosts.keys() == {"h1"} for snap, _ in results)
        # A caller never gets a read that began before it asked.
        placed = await coordinator.place(gpu("r1"))
        snap, _ = await coordinator.snapshot()
        assert placed.placement_id in snap.hosts[HostId("h1")].allocations.values()

    arun(body())


def test_a_failed_read_reaches_every_caller_of_its_round_and_the_next_call_reads_again(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        coordinator = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await coordinator.register(inventory(), "agent:1")
        # A host record without its fields: the read fails to interpret it.
        await redis_client.sadd("tessera:hosts", "broken")
        await redis_client.hset(schema.host("broken"), "alloc_generation", 1)
        outcomes = await asyncio.gather(
            *(coordinator.snapshot() for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(o, Exception) and "broken" in str(o) for o in outcomes), outcomes
        await redis_client.delete(schema.host("broken"))
        snap, _ = await coordinator.snapshot()
        assert set(snap.hosts) == {"h1"}

    arun(body())
