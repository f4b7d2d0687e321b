"""The replica roster: memberships renewed on the store's clock, left on shutdown, run out alone."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.store import schema
from tessera.scheduler.store.roster import MAX_REPLICAS, RosterStore

from ..conftest import Runner


def test_renewing_members_see_each_other(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        roster = RosterStore(redis_client)
        assert await roster.renew("replica-a", 10_000) == {"replica-a"}
        assert await roster.renew("replica-b", 10_000) == {"replica-a", "replica-b"}
        assert await roster.renew("replica-a", 10_000) == {"replica-a", "replica-b"}

    arun(body())


def test_a_member_that_leaves_is_gone_at_once(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        roster = RosterStore(redis_client)
        await roster.renew("replica-a", 10_000)
        await roster.renew("replica-b", 10_000)
        await roster.leave("replica-b")
        assert await roster.renew("replica-a", 10_000) == {"replica-a"}

    arun(body())


def test_a_member_that_stops_renewing_runs_out(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        roster = RosterStore(redis_client)
        await roster.renew("replica-dead", 150)
        assert await roster.renew("replica-a", 10_000) == {"replica-a", "replica-dead"}
        await asyncio.sleep(0.3)
        assert await roster.renew("replica-a", 10_000) == {"replica-a"}
        # Dropped from the store, not only from the answer.
        assert await redis_client.zscore(schema.REPLICAS, "replica-dead") is None

    arun(body())


def test_an_overgrown_roster_is_read_in_part_and_still_names_the_reader(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        roster = RosterStore(redis_client)
        # Others that outlive the reader's own membership come after it in
        # score order: the bounded read may leave the reader out.
        await redis_client.zadd(
            schema.REPLICAS, {f"replica-{i:03d}": 2**50 + i for i in range(MAX_REPLICAS * 2)}
        )
        members = await roster.renew("replica-me", 10_000)
        assert len(members) <= MAX_REPLICAS + 1
        assert "replica-me" in members

    arun(body())


@pytest.mark.parametrize("name", ["", "has space", "x" * 129, "{tag}", "-leading-dash", "é"])
def test_names_that_are_not_short_printable_ids_are_refused(
    name: str, redis_client: aioredis.Redis, arun: Runner
) -> None:
    roster = RosterStore(redis_client)
    with pytest.raises(ValueError, match="replica name"):
        arun(roster.renew(name, 1_000))
    with pytest.raises(ValueError, match="replica name"):
        arun(roster.leave(name))


def test_a_membership_shorter_than_a_millisecond_is_refused(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    with pytest.raises(ValueError, match="ttl_ms"):
        arun(RosterStore(redis_client).renew("replica-a", 0))
