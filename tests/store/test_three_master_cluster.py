"""The placement path on a Redis Cluster of three primaries, through ``redis+cluster://``.

``test_cluster_slots.py`` proves no access crosses a slot on a one-node
cluster; here the slots are spread over three Valkey primaries and the
scheduler talks to them with a cluster client, as an operator's REDIS_URL
``redis+cluster://HOST:PORT`` makes it: hosts (and their shards' feeds) live
on different primaries, two replicas place and release concurrently while
the housekeeper sweeps, and at the end the store holds exactly what the
replicas acknowledged, each device with one owner, and each replica's live
model agrees with the store.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from tessera.scheduler.core.identity import HostId
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import SchedulerError
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.service.store_health import StoreHealthWatcher
from tessera.scheduler.store import schema
from tessera.scheduler.store.connection import StoreUnusableError, connect_store
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.scheduler.store.safety import check_durability
from tessera.v1 import placement_pb2

from ..conftest import Runner
from ..scheduler.service.test_cluster_model import two_gpu_host
from ..scheduler.service.test_housekeeping import Clock, Host, gpu
from .valkey_cluster import valkey_cluster

HOSTS = [f"node-{i:02d}" for i in range(24)]
TASKS = 16
OPERATIONS = 240


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis+cluster://`` of a fresh three-primary cluster."""
    with valkey_cluster(tmp_path_factory.mktemp("valkey-3")) as ports:
        yield f"redis+cluster://127.0.0.1:{ports[0]}"


def test_a_cluster_url_is_checked_like_any_other(arun: Runner) -> None:
    with pytest.raises(StoreUnusableError, match="database 0 only"):
        arun(connect_store("redis+cluster://127.0.0.1:7000/3", wait_s=0))
    with pytest.raises(StoreUnusableError, match="unsupported scheme"):
        arun(connect_store("redis+socket://127.0.0.1:26379", wait_s=0))


def test_two_replicas_place_and_release_across_three_primaries(
    cluster_url: str, arun: Runner
) -> None:
    async def body() -> None:
        client = await connect_store(cluster_url)
        assert isinstance(client, RedisCluster)
        # Every primary keeps what it acknowledged (appendonly, noeviction).
        assert await check_durability(client, allow_unsafe=False) == []
        store = RedisStateStore(client)
        agents, clock = Host(), Clock()
        replicas = [PlacementCoordinator(store, agents, clock_ms=clock) for _ in range(2)]
        for host_id in HOSTS:
            await replicas[0].register(two_gpu_host(host_id), f"{host_id}:7000")
        # The hosts, and so their feeds, are spread over every primary.
        primaries = {getattr(client.get_node_from_key(schema.host(h)), "name", "") for h in HOSTS}
        assert len(primaries) == 3, primaries
        keeper = Housekeeper(store, agents, HousekeepingSettings(), owner="k", clock_ms=clock)

        held: dict[str, placement_pb2.Placement] = {}
        refused = 0

        async def worker(k: int) -> None:
            nonlocal refused
            rng = random.Random(k)
            for i in range(OPERATIONS // TASKS):
                replica = replicas[(k + i) % 2]
                if held and rng.random() < 0.45:
                    placement_id = rng.choice(sorted(held))
                    placement = held.pop(placement_id)
                    await replica.release(placement.placement_id, "")
                    continue
                try:
                    placed = await replica.place(gpu(f"w{k}-{i}"))
                except SchedulerError:
                    refused += 1  # the fleet is full for now
                    continue
                held[placed.placement_id] = placed

        async def sweeper() -> None:
            for _ in range(3):
                await keeper.round()
                await asyncio.sleep(0.05)

        await asyncio.gather(*(worker(k) for k in range(TASKS)), sweeper())

        # The store holds exactly the acknowledged placements, each device once.
        stored = (await store.snapshot()).hosts
        owners: dict[tuple[str, str], str] = {}
        for host_id, record in stored.items():
            for slot, placement_id in record.allocations.items():
                owners[(host_id, slot)] = placement_id
        assert set(owners.values()) == set(held)
        for placement in held.values():
            for unit in placement.allocations:
                key = (placement.host_id, f"iommu-group:{unit.iommu_group}")
                assert owners[key] == placement.placement_id
        # Each replica's model, brought up to date, agrees with the store.
        for replica in replicas:
            await replica.refreshed()
            live = replica.model.live().hosts
            for host_id, record in stored.items():
                state = live[HostId(host_id)]
                assert dict(state.allocations) == dict(record.allocations), host_id
        total = sum(replica.commit_outcomes["COMMITTED"] for replica in replicas)
        assert total >= len(held) > 0
        for placement_id in sorted(held):
            await replicas[0].release(placement_id, "")
        assert all(not r.allocations for r in (await store.snapshot()).hosts.values())
        await client.aclose()

    arun(body())


def test_cluster_urls_that_cannot_work_are_refused_with_one_line(
    cluster_url: str, valkey_url: str, arun: Runner
) -> None:
    # Parameters the cluster client does not take: refused before connecting.
    with pytest.raises(StoreUnusableError, match="ssl_ca_path is not supported"):
        arun(connect_store("rediss+cluster://127.0.0.1:7000?ssl_ca_path=/etc/ssl", wait_s=0))
    # A cluster URL naming a server that is not in a cluster.
    single = valkey_url.replace("redis://", "redis+cluster://", 1)
    with pytest.raises(StoreUnusableError, match="not usable as a Redis Cluster"):
        arun(connect_store(single, wait_s=1))
    # A plain URL naming one node of a cluster: its first command on another slot would fail.
    node = cluster_url.replace("redis+cluster://", "redis://", 1)
    with pytest.raises(StoreUnusableError, match="one node of a Redis Cluster"):
        arun(connect_store(node, wait_s=1))


def test_concurrent_snapshots_on_a_cluster_share_the_clients_connections(
    cluster_url: str, arun: Runner
) -> None:
    """Many hosts, several full reads at once: within the client's connection limit."""

    async def body() -> None:
        client = await connect_store(cluster_url)
        store = RedisStateStore(client)
        for i in range(120):
            inventory = two_gpu_host(f"many-{i:03d}")
            await store.upsert_host(
                inventory.host_id,
                inventory.SerializeToString(),
                inventory_generation=1,
                boot_id="b1",
                agent_address="agent:1",
                now_ms=1,
            )
        reads = await asyncio.gather(*(store.snapshot() for _ in range(8)))
        assert all(len(r.hosts) >= 120 for r in reads)
        # The health probe asks the cluster as a whole.
        watcher = StoreHealthWatcher(client, _NoHealth(), ("",))
        assert await watcher.probe() is None
        await client.aclose()

    arun(body())


class _NoHealth:
    """The health servicer's setter, for a watcher that is only probed here."""

    async def set(self, service: str, status: int) -> None:
        return None
