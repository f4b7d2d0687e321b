"""A replica's model takes its own writes from their answers, not by reading the host back.

A replica's commits and releases change hosts that the change feed then
names. When the feed names a host no further than this replica's own writes
in flight on it can take it, the model waits for their answers instead of
reading the host (most of a busy replica's reads otherwise); answers that
come back out of order are folded in generation order. When the answers,
all in, do not reach what the feed showed, someone else moved the host too,
and the model reads it once. Throughout, it ends exactly where the store is.

Here the store's writes are made directly (``commit_on``), standing for a
replica's commits whose answers the test hands to the model when it chooses.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import CommitOutcome, RedisStateStore

from ...conftest import Runner
from ...store.test_commit_guards import commit_on, register, three_gpu_host
from .test_housekeeping import Clock

H = "h1"
ACME = TenantName("acme")


@pytest.fixture
def store(redis_client: aioredis.Redis) -> RedisStateStore:
    return RedisStateStore(redis_client)


@pytest.fixture
def model(store: RedisStateStore, arun: Runner) -> LiveCluster:
    """A model that has read h1 (three GPUs, groups 1-3), nothing on it."""

    async def read() -> LiveCluster:
        await register(store, three_gpu_host(H))
        model = LiveCluster(store, Clock())
        await model.refresh()
        return model

    return arun(read())


async def land(store: RedisStateStore, token: str, group: int) -> int:
    """Commit one GPU on h1 in the store as planned on its state now; the host's generation."""
    record = await store.get_host(H)
    assert record is not None
    result = await commit_on(
        store, three_gpu_host(H), token, [f"iommu-group:{group}"], record.versions, tenant=ACME
    )
    assert result.outcome is CommitOutcome.COMMITTED, result.detail
    return result.alloc_generation


def assume(model: LiveCluster, token: str, group: int) -> PlacementId:
    """The model plans as if this replica's commit of one GPU were landing."""
    name = PlacementId(schema.placement_id(token, H))
    model.assume(H, [SlotKey(f"iommu-group:{group}")], name, ACME)
    return name


async def agrees_with_the_store(store: RedisStateStore, model: LiveCluster) -> None:
    record = await store.get_host(H)
    assert record is not None
    mine = model.live().hosts[HostId(H)]
    assert mine.alloc_generation == record.alloc_generation
    assert dict(mine.allocations) == dict(record.allocations)
    assert dict(mine.versions) == dict(record.versions)
    assert mine.planned == ()


def test_answers_out_of_order_are_folded_in_generation_order_without_reading_the_host(
    store: RedisStateStore, model: LiveCluster, arun: Runner
) -> None:
    async def body() -> None:
        first, second = assume(model, "first", 1), assume(model, "second", 2)
        g1 = await land(store, "first", 1)
        g2 = await land(store, "second", 2)
        read = model.stats.hosts_reloaded
        # The feed names h1 twice, as far as the two writes in flight take it.
        await model.refresh()
        assert model.stats.hosts_reloaded == read
        model.settle(H, second, g2)
        model.settle(H, first, g1)
        await agrees_with_the_store(store, model)
        await model.refresh()
        assert model.stats.hosts_reloaded == read

    arun(body())


def test_a_host_moved_by_someone_else_meanwhile_is_read_once_every_answer_is_in(
    store: RedisStateStore, model: LiveCluster, arun: Runner
) -> None:
    async def body() -> None:
        mine = assume(model, "mine", 1)
        # Another replica takes GPU 2 first: the feed shows one change, as
        # far as the one write in flight could take the host.
        await land(store, "theirs", 2)
        read = model.stats.hosts_reloaded
        await model.refresh()
        assert model.stats.hosts_reloaded == read
        generation = await land(store, "mine", 1)
        model.settle(H, mine, generation)
        # Its answer is one past a change the model never saw: read it.
        await model.refresh()
        assert model.stats.hosts_reloaded == read + 1
        await agrees_with_the_store(store, model)

    arun(body())


def test_a_feed_further_ahead_than_the_writes_in_flight_is_read_at_once(
    store: RedisStateStore, model: LiveCluster, arun: Runner
) -> None:
    async def body() -> None:
        assume(model, "mine", 1)
        await land(store, "theirs", 2)
        await land(store, "also-theirs", 3)
        read = model.stats.hosts_reloaded
        await model.refresh()
        assert model.stats.hosts_reloaded == read + 1
        state = model.live().hosts[HostId(H)]
        assert set(state.allocations) >= {"iommu-group:2", "iommu-group:3"}

    arun(body())


def test_a_write_whose_answer_was_lost_makes_the_model_read_the_host(
    store: RedisStateStore, model: LiveCluster, arun: Runner
) -> None:
    async def body() -> None:
        mine = assume(model, "mine", 1)
        await land(store, "mine", 1)
        await model.refresh()
        read = model.stats.hosts_reloaded
        model.settle(H, mine, 0)  # the connection dropped: outcome unknown
        await model.refresh()
        assert model.stats.hosts_reloaded == read + 1
        await agrees_with_the_store(store, model)

    arun(body())
