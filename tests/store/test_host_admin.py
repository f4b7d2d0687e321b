"""Cordon, uncordon and forget of a host in the store, on a real server.

A cordon is a few fields in the host's own hash: registration and heartbeats
must leave them alone. Forgetting a host deletes every key with its hash tag
(checked by SCAN, so a per-host key added later and not listed in
``schema.all_host_keys`` fails here) and the request records of the
placements it drops.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import (
    ClaimOutcome,
    CommitOutcome,
    ForgetOutcome,
    RedisStateStore,
)

from ..conftest import Runner
from .test_redis_store import H, claim, commit, dump, pid, register


def _key(key: bytes | str) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def _host_prefix(host_id: str) -> str:
    """What every key of the host starts with: its shard's hash tag, then its id."""
    return schema.host(host_id).removesuffix(":host") + ":"


async def host_keys_left(client: aioredis.Redis, host_id: str) -> list[bytes]:
    """Every key of the host (its shard's tag and its id), found by SCAN."""
    # SCAN's MATCH is a glob: escape the braces of the hash tag.
    pattern = _host_prefix(host_id).replace("{", "\\{").replace("}", "\\}") + "*"
    return sorted([key async for key in client.scan_iter(match=pattern, count=1000)])


# -- cordon ----------------------------------------------------------------------


def test_a_cordon_is_recorded_with_reason_who_and_when(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert await store.cordon_host(H, reason="bad DIMM", by="admin/ops", now_ms=5000)
        record = await store.get_host(H)
        assert record is not None
        assert record.cordoned
        assert (record.cordon_reason, record.cordoned_by, record.cordoned_ms) == (
            "bad DIMM",
            "admin/ops",
            5000,
        )
        snapshot = await store.snapshot()
        assert snapshot.hosts[H].cordoned
        assert await store.uncordon_host(H)
        record = await store.get_host(H)
        assert record is not None and not record.cordoned
        assert (record.cordon_reason, record.cordoned_by, record.cordoned_ms) == ("", "", 0)
        assert await store.uncordon_host(H)  # idempotent

    arun(body())


def test_a_cordon_survives_re_registration_a_new_boot_and_heartbeats(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert await store.cordon_host(H, reason="maintenance", by="admin/ops", now_ms=5000)
        assert await register(store, generation=2, inventory=b"changed", now_ms=6000)
        assert await store.touch_host(H, "boot-1", 7000)
        assert await register(store, boot_id="boot-2", now_ms=8000)
        assert await store.touch_host(H, "boot-2", 9000)
        record = await store.get_host(H)
        assert record is not None and record.last_heartbeat_ms == 9000
        assert record.cordoned and record.cordon_reason == "maintenance"

    arun(body())


def test_a_plan_made_before_a_cordon_cannot_commit(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        before = await store.get_host(H)
        assert before is not None
        assert await store.cordon_host(H, reason="", by="admin/ops", now_ms=5000)
        result = await commit(store, "late", ["iommu-group:1"], seen=before.versions)
        assert result.outcome is CommitOutcome.CONFLICT
        assert "epoch" in result.detail
        # Cordoning again does not move the generation once more.
        after = await store.get_host(H)
        assert await store.cordon_host(H, reason="again", by="admin/ops", now_ms=6000)
        again = await store.get_host(H)
        assert after is not None and again is not None
        assert again.alloc_generation == after.alloc_generation == before.alloc_generation + 1

    arun(body())


def test_a_kept_cordon_is_left_as_it_is_and_a_new_one_replaces_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert await store.cordon_host(H, reason="first", by="admin/a", now_ms=1)
        assert await store.cordon_host(H, reason="drained", by="admin/b", now_ms=2, keep=True)
        record = await store.get_host(H)
        assert record is not None
        assert (record.cordon_reason, record.cordoned_by, record.cordoned_ms) == (
            "first",
            "admin/a",
            1,
        )
        assert await store.cordon_host(H, reason="second", by="admin/b", now_ms=3)
        record = await store.get_host(H)
        assert record is not None and record.cordon_reason == "second"

    arun(body())


def test_a_cordon_or_uncordon_of_an_unknown_host_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, "other")
        before = await dump(redis_client)
        assert not await store.cordon_host(H, reason="", by="admin/ops", now_ms=1)
        assert not await store.uncordon_host(H)
        assert await dump(redis_client) == before

    arun(body())


# -- forget ----------------------------------------------------------------------


def test_a_host_with_placements_is_not_forgotten_and_nothing_is_written(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert (await commit(store, "b", ["iommu-group:2"])).outcome is CommitOutcome.COMMITTED
        assert await store.update_placement(H, pid("b"), b"p", state="failed")
        before = await dump(redis_client)
        result = await store.forget_host(H)
        assert result.outcome is ForgetOutcome.BUSY
        assert result.placements == {pid("a"): "pending", pid("b"): "failed"}
        assert await dump(redis_client) == before

    arun(body())


def test_forgetting_a_host_removes_every_key_of_it_and_says_so_on_the_feed(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await register(store, "other")
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert await store.release(H, pid("a"))
        assert await store.cordon_host(H, reason="gone", by="admin/ops", now_ms=1)
        assert await host_keys_left(redis_client, H)  # the premise: there are some
        mine = _host_prefix(H).encode()
        feed = set(map(str.encode, schema.feed_keys(H)))
        untouched = {
            k: v
            for k, v in (await dump(redis_client)).items()
            if not _key(k).startswith(mine) and _key(k) not in feed
        }
        entries = await redis_client.xlen(schema.feed(schema.shard_of(H)))
        result = await store.forget_host(H)
        assert result.outcome is ForgetOutcome.FORGOTTEN and result.placements == {}
        assert await host_keys_left(redis_client, H) == []
        assert await redis_client.smembers(schema.HOSTS) == {b"other"}
        assert await store.get_host(H) is None
        assert set((await store.snapshot()).hosts) == {"other"}
        # Only the forgotten host's keys (and its entry in the index) went,
        # and its shard's feed says it changed.
        after = await dump(redis_client)
        hosts_key = schema.HOSTS.encode()
        assert {k: v for k, v in after.items() if _key(k) not in {hosts_key, *feed}} == {
            k: v for k, v in untouched.items() if _key(k) != hosts_key
        }
        last: list[Any] = list(
            await redis_client.xrevrange(schema.feed(schema.shard_of(H)), count=1) or []
        )
        assert await redis_client.xlen(schema.feed(schema.shard_of(H))) == entries + 1
        assert last[0][1][schema.F_FEED_HOST.encode()] == H.encode()

    arun(body())


def test_a_forced_forget_drops_the_placements_and_their_request_ids(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert (await commit(store, "b", ["iommu-group:2"])).outcome is CommitOutcome.COMMITTED
        assert await redis_client.exists(schema.request("req-a"), schema.request("req-b")) == 2
        result = await store.forget_host(H, force=True)
        assert result.outcome is ForgetOutcome.FORGOTTEN
        assert result.placements == {pid("a"): "req-a", pid("b"): "req-b"}
        assert await host_keys_left(redis_client, H) == []
        assert await redis_client.exists(schema.request("req-a"), schema.request("req-b")) == 0
        assert await store.get_placement(pid("a")) is None
        assert await store.placement_for_request("req-a") is None
        # The request id is free for a new placement.
        assert (await claim(store, "req-a", "call-new")).outcome is ClaimOutcome.CLAIMED

    arun(body())


def test_a_forced_forget_leaves_a_request_record_that_moved_on(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        # The request id now names another placement (released, then placed
        # again elsewhere): forgetting this host must not drop that record.
        await redis_client.hset(schema.request("req-a"), schema.F_PLACEMENT_ID, pid("z", "other"))
        result = await store.forget_host(H, force=True)
        assert result.outcome is ForgetOutcome.FORGOTTEN
        assert await redis_client.exists(schema.request("req-a")) == 1

    arun(body())


def test_a_forget_of_a_dead_host_checks_in_the_store_that_it_is_still_dead(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """The housekeeper's forget: a host whose agent came back since its read stays."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, now_ms=1000)
        # Silent since 1000 but its lease is not marked expired: alive.
        before = await dump(redis_client)
        assert (await store.forget_host(H, silent_before_ms=5000)).outcome is ForgetOutcome.ALIVE
        assert await dump(redis_client) == before
        # Its lease expired, but its last heartbeat is not older than the deadline: alive.
        assert await store.expire_host(H, 2000)
        expired = await dump(redis_client)
        for deadline in (900, 1000):
            outcome = (await store.forget_host(H, silent_before_ms=deadline)).outcome
            assert outcome is ForgetOutcome.ALIVE
        assert await dump(redis_client) == expired
        assert (await store.forget_host(H, silent_before_ms=1001)).outcome is (
            ForgetOutcome.FORGOTTEN
        )
        assert await host_keys_left(redis_client, H) == []

    arun(body())


def test_a_dead_host_with_placements_is_not_forgotten_by_its_deadline_alone(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, now_ms=1000)
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert await store.expire_host(H, 2000)
        result = await store.forget_host(H, silent_before_ms=2000)
        assert result.outcome is ForgetOutcome.BUSY and result.placements == {pid("a"): "pending"}
        assert await store.get_host(H) is not None

    arun(body())


def test_forgetting_an_unknown_host_finds_nothing_and_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, "other")
        before = await dump(redis_client)
        assert (await store.forget_host(H)).outcome is ForgetOutcome.NOT_FOUND
        assert (await store.forget_host(H, force=True)).outcome is ForgetOutcome.NOT_FOUND
        assert await dump(redis_client) == before

    arun(body())


def test_a_forgotten_host_registers_again_as_new_and_uncordoned(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, generation=7)
        assert (await commit(store, "a", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert await store.cordon_host(H, reason="bad", by="admin/ops", now_ms=1)
        assert (await store.forget_host(H, force=True)).outcome is ForgetOutcome.FORGOTTEN
        # The agent's next heartbeat is refused: it must register again.
        assert not await store.touch_host(H, "boot-1", 2000)
        assert await host_keys_left(redis_client, H) == []
        # Even a report older than the forgotten one is taken: the host is new.
        assert await register(store, generation=3, now_ms=3000)
        record = await store.get_host(H)
        assert record is not None
        assert not record.cordoned
        assert (record.alloc_generation, record.inventory_generation) == (0, 3)
        assert record.allocations == {} and record.tenants == {} and record.fences == {}
        assert await redis_client.smembers(schema.HOSTS) == {H.encode()}

    arun(body())
