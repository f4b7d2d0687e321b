"""The store's key layout: marked on first use, and a store in another layout refused."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import LayoutMismatchError, RedisStateStore

from ..conftest import Runner


def test_an_empty_store_is_marked_and_claiming_again_is_fine(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await store.claim_layout()
        assert await redis_client.get(schema.LAYOUT) == schema.LAYOUT_VERSION.encode()
        await store.claim_layout()  # a second replica, or a restart

    arun(body())


def test_hosts_written_before_layouts_were_marked_are_refused_and_nothing_is_written(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        await redis_client.sadd(schema.HOSTS, "old-host")
        await redis_client.hset("tessera:{old-host}:host", "boot_id", "b1")
        with pytest.raises(LayoutMismatchError, match="before layout markers"):
            await RedisStateStore(redis_client).claim_layout()
        assert not await redis_client.exists(schema.LAYOUT)

    arun(body())


def test_a_store_in_another_layout_is_refused(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        await redis_client.set(schema.LAYOUT, "3")
        with pytest.raises(LayoutMismatchError, match="layout '3'"):
            await RedisStateStore(redis_client).claim_layout()

    arun(body())


def test_replicas_starting_together_on_an_old_store_all_refuse_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        await redis_client.sadd(schema.HOSTS, "old-host")
        outcomes = await asyncio.gather(
            *(RedisStateStore(redis_client).claim_layout() for _ in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(o, LayoutMismatchError) for o in outcomes), outcomes

    arun(body())
