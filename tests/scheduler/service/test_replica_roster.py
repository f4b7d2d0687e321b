"""A replica keeps its roster membership and tells its engine who else places."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.service.replica_roster import ReplicaRoster, RosterSettings
from tessera.scheduler.store import schema
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.roster import RosterStore

from ...conftest import Runner

FAST = RosterSettings(interval_s=0.05, ttl_s=0.5)


def test_the_engine_hears_of_each_change_of_the_roster_once(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        heard: list[frozenset[str]] = []
        mine = ReplicaRoster(RosterStore(redis_client), "replica-a", heard.append, FAST)
        other = RosterStore(redis_client)
        await mine.renew()
        await mine.renew()
        await other.renew("replica-b", 10_000)
        await mine.renew()
        await mine.renew()
        await other.leave("replica-b")
        await mine.renew()
        assert heard == [frozenset({"replica-a", "replica-b"}), frozenset({"replica-a"})]

    arun(body())


def test_two_running_replicas_split_the_hosts_and_one_stopping_hands_its_share_back(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        a, b = Engine(affinity="replica-a"), Engine(affinity="replica-b")
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(
                ReplicaRoster(RosterStore(redis_client), e.affinity, e.set_peers, FAST).run(stop)
            )
            for e, stop in ((a, stop_a), (b, stop_b))
        ]
        hosts = [f"host-{i:02d}" for i in range(32)]
        for _ in range(100):
            await asyncio.sleep(FAST.interval_s)
            if not all(a.in_share(h) for h in hosts) and not all(b.in_share(h) for h in hosts):
                break
        # Split: each host is exactly one replica's.
        assert all(a.in_share(h) != b.in_share(h) for h in hosts)
        stop_b.set()
        await tasks[1]
        # B left on its way out: A has every host again within a renewal.
        assert await redis_client.zscore(schema.REPLICAS, "replica-b") is None
        for _ in range(100):
            await asyncio.sleep(FAST.interval_s)
            if all(a.in_share(h) for h in hosts):
                break
        assert all(a.in_share(h) for h in hosts)
        stop_a.set()
        await tasks[0]

    arun(body())


def test_a_store_that_does_not_answer_keeps_the_members_last_seen(
    tmp_path: Path, arun: Runner
) -> None:
    async def body() -> None:
        heard: list[frozenset[str]] = []
        with EmbeddedValkey(tmp_path) as server:
            client = aioredis.Redis.from_url(
                server.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5
            )
            await RosterStore(client).renew("replica-b", 10_000)
            roster = ReplicaRoster(RosterStore(client), "replica-a", heard.append, FAST)
            await roster.renew()
        # The server is gone: the renewal fails, the members stay.
        await roster.renew()
        assert roster.members == {"replica-a", "replica-b"}
        assert heard == [frozenset({"replica-a", "replica-b"})]
        await client.aclose()

    arun(body())


@pytest.mark.parametrize(("interval", "ttl"), [(0.0, 1.0), (2.0, 2.0), (3.0, 1.0), (-1.0, 5.0)])
def test_a_roster_renewed_no_more_often_than_it_runs_out_is_refused(
    interval: float, ttl: float
) -> None:
    with pytest.raises(ValueError, match="roster interval"):
        RosterSettings(interval_s=interval, ttl_s=ttl)
