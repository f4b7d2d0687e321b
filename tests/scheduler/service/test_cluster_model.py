"""A replica's live model of the cluster, followed through the change feed.

Two replicas (two coordinators, each with its own model) share one real
Valkey. What one writes, the other sees after its next refresh, reading again
only the hosts the feed names; heartbeats that change nothing stay off the
feed; a feed with a hole (trimmed, or the store's data lost) makes the model
read everything again; a lease expires as an event and comes back with the
next heartbeat.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.core.identity import HostId
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import NoCapacityError
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner
from .test_housekeeping import Clock, Host, gpu, inventory

LEASE = HousekeepingSettings(interval_s=1, pending_after_s=60, releasing_after_s=60, lease_s=20)


def two_gpu_host(host_id: str, generation: int = 1) -> inventory_pb2.HostInventory:
    """A host with two GPUs, each alone in its IOMMU group (test_housekeeping's, renamed)."""
    host = inventory()
    host.host_id = host_id
    host.generation = generation
    return host


async def feed_length(client: aioredis.Redis) -> int:
    """Entries on every shard's feed together."""
    return sum([await client.xlen(schema.feed(s)) for s in range(schema.FEED_SHARDS)])


def held(coordinator: PlacementCoordinator, host_id: str) -> set[str]:
    """The placements holding slots on a host, as the coordinator's model has it."""
    state = coordinator.model.live().hosts.get(HostId(host_id))
    return set(state.allocations.values()) if state else set()


def test_a_replica_sees_another_replicas_commit_reading_only_the_host_that_moved(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        clock = Clock()
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=clock)
        b = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=clock)
        for h in ("h1", "h2", "h3"):
            await a.register(two_gpu_host(h), f"agent-{h}:1")
        await b.refreshed()
        assert b.model.stats.resyncs == 1 and set(b.model.live().hosts) == {"h1", "h2", "h3"}
        reloaded = b.model.stats.hosts_reloaded
        placed = await a.place(gpu("r1"))
        await b.refreshed()
        assert placed.placement_id in held(b, placed.host_id)
        assert b.model.stats.hosts_reloaded == reloaded + 1  # only the host that moved
        assert b.model.stats.resyncs == 1
        await a.release(placed.placement_id, "")
        await b.refreshed()
        assert held(b, placed.host_id) == set()

    arun(body())


def test_a_replica_plans_around_its_own_commit_before_the_feed_brings_it_back(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        await a.register(two_gpu_host("h1"), "agent:1")
        first = await a.place(gpu("r1"))
        # No refresh since: the model took the commit itself.
        assert first.placement_id in held(a, "h1")
        reloaded = a.model.stats.hosts_reloaded
        second = await a.place(gpu("r2"))
        assert held(a, "h1") >= {first.placement_id, second.placement_id}
        # The feed named h1 (the first commit) at the generation the model
        # held already: it was not read again.
        assert a.model.stats.hosts_reloaded == reloaded

    arun(body())


def test_heartbeats_that_change_nothing_stay_off_the_feed(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        clock = Clock()
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=clock)
        await a.register(two_gpu_host("h1"), "agent:1")
        before = await feed_length(redis_client)
        for _ in range(5):
            clock.ms += 5_000
            assert await a.heartbeat("h1", "b1", None)
        # Re-registering the same report from the same address changes nothing either.
        assert await a.register(two_gpu_host("h1"), "agent:1")
        assert await feed_length(redis_client) == before
        # A changed inventory does go on it.
        assert await a.heartbeat("h1", "b1", two_gpu_host("h1", generation=2))
        assert await feed_length(redis_client) == before + 1

    arun(body())


def test_a_trimmed_feed_makes_the_model_read_everything_again(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        b = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        await a.register(two_gpu_host("h1"), "agent:1")
        await b.refreshed()
        placed = await a.place(gpu("r1"))
        # The entry b has not read yet falls off the feed (as MAXLEN trims it).
        shard = schema.shard_of("h1")
        await redis_client.xtrim(schema.feed(shard), maxlen=0)
        await redis_client.incr(schema.feed_seq(shard))  # a later change, its entry kept
        await redis_client.xadd(schema.feed(shard), {"h": "h1", "n": "999"})
        await b.refreshed()
        assert b.model.stats.resyncs == 2
        assert placed.placement_id in held(b, "h1")

    arun(body())


def test_after_the_store_loses_its_data_the_model_never_plans_on_what_it_remembers(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        await a.register(two_gpu_host("h1"), "agent:1")
        await a.place(gpu("r1"))
        await a.place(gpu("r2"))
        await a.refreshed()
        # The store restarts empty; the agent registers its host again.
        await redis_client.flushall()
        await a.register(two_gpu_host("h1"), "agent:1")
        # The model remembered both GPUs taken; the store says both are free,
        # with generations counted anew. The feed restarted its numbering:
        # the model reads everything again and places on the host as it is.
        again = await a.place(gpu("r3"))
        assert again.host_id == "h1"
        assert held(a, "h1") == {again.placement_id}
        await a.place(gpu("r4"))
        try:
            await a.place(gpu("r5"))
            raise AssertionError("a third GPU was placed on a two-GPU host")
        except NoCapacityError:
            pass

    arun(body())


def test_a_lease_expires_as_an_event_and_comes_back_with_the_next_heartbeat(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        clock = Clock()
        store = RedisStateStore(redis_client)
        a = PlacementCoordinator(store, Host(), clock_ms=clock)
        keeper = Housekeeper(store, Host(), LEASE, owner="k", clock_ms=clock)
        await a.register(two_gpu_host("h1"), "agent:1")
        await a.refreshed()
        assert a.model.live().hosts[HostId("h1")].schedulable
        clock.ms += 19_000
        assert (await keeper.round()).leases_expired == 0  # within the lease
        clock.ms += 2_000
        assert (await keeper.round()).leases_expired == 1
        assert (await keeper.round()).leases_expired == 0  # once, as a transition
        await a.refreshed()
        assert not a.model.live().hosts[HostId("h1")].schedulable
        try:
            await a.place(gpu("r1"))
            raise AssertionError("placed on a host whose lease expired")
        except NoCapacityError as err:
            assert "lease" in str(err.reasons) or "lease" in str(err)
        assert await a.heartbeat("h1", "b1", None)
        await a.refreshed()
        assert a.model.live().hosts[HostId("h1")].schedulable
        assert (await a.place(gpu("r2"))).host_id == "h1"

    arun(body())


def test_changed_since_names_exactly_the_hosts_that_changed(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        b = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        for h in ("h1", "h2", "h3"):
            await a.register(two_gpu_host(h), f"agent-{h}:1")
        await b.refreshed()
        start = b.model.live().revision
        assert b.model.changed_since(start) == set()
        assert b.model.changed_since(start - 1) is None  # before the resync: compare all
        await a.cordon("h2", "maintenance", "admin/ops")
        await a.forget("h3", force=False, by="admin/ops")
        await b.refreshed()
        assert b.model.changed_since(start) == {"h2", "h3"}
        assert set(b.model.live().hosts) == {"h1", "h2"}
        assert not b.model.live().hosts[HostId("h2")].schedulable
        later = b.model.live().revision
        await a.uncordon("h2", "admin/ops")
        await b.refreshed()
        assert b.model.changed_since(later) == {"h2"}
        assert b.model.live().hosts[HostId("h2")].schedulable

    arun(body())


async def with_cpu_host(redis_client: aioredis.Redis) -> PlacementCoordinator:
    """A coordinator with cpu-h1 registered: two GPUs, 16 CPUs and 64 GiB on one NUMA node."""
    coordinator = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
    host = two_gpu_host("cpu-h1")
    host.numa_nodes.add(id=0, cpulist="0-15", memory_kib=64 * 1024 * 1024, distances=[10])
    await coordinator.register(host, "agent-cpu-h1:1")
    return coordinator


def test_host_cpu_and_memory_asked_with_a_placement_are_held_until_its_release(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """A VM's vCPUs and RAM beside its GPU: held on the host its agent says has them."""

    async def body() -> None:
        coordinator = await with_cpu_host(redis_client)

        def vm(request_id: str, cpu_milli: int) -> placement_pb2.PlacementRequest:
            msg = gpu(request_id)
            msg.cpu_milli, msg.memory_mib = cpu_milli, 32 * 1024
            return msg

        first = await coordinator.place(vm("vm-1", 12_000))
        assert (first.cpu_milli, first.memory_mib) == (12_000, 32 * 1024)
        with pytest.raises(NoCapacityError, match="host-share"):
            # A GPU is left, 4 CPUs are not 8.
            await coordinator.place(vm("vm-2", 8_000))
        await coordinator.release(first.placement_id, "")
        again = await coordinator.place(vm("vm-3", 16_000))
        assert again.host_id == "cpu-h1"

    arun(body())


def test_two_tenants_using_one_request_id_each_hold_their_own_host_share(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Request ids are each tenant's own: another tenant's same id never blocks a placement."""

    async def body() -> None:
        coordinator = await with_cpu_host(redis_client)

        def vm(tenant: str) -> placement_pb2.PlacementRequest:
            msg = gpu("vm-1")
            msg.tenant, msg.cpu_milli, msg.memory_mib = tenant, 4_000, 8 * 1024
            return msg

        first = await coordinator.place(vm("acme"))
        second = await coordinator.place(vm("globex"))
        assert {first.tenant, second.tenant} == {"acme", "globex"}
        assert first.host_id == second.host_id == "cpu-h1"
        state = coordinator.model.live().hosts[HostId("cpu-h1")]
        held = {p for s, p in state.allocations.items() if s.startswith("host-share:")}
        assert held == {first.placement_id, second.placement_id}

    arun(body())
