"""RedisStateStore: registry, atomic commit, idempotency and release on a real server."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from scheduler.store import schema
from scheduler.store.redis_store import CommitOutcome, CommitResult, RedisStateStore

from ..conftest import Runner

H = "host-a"
INVENTORY = b"\x08\x01\x12\x06host-a\xff\x00"  # opaque bytes, not valid UTF-8


async def register(
    store: RedisStateStore,
    host_id: str = H,
    *,
    generation: int = 1,
    boot_id: str = "boot-1",
    inventory: bytes = INVENTORY,
    now_ms: int = 1000,
) -> bool:
    return await store.upsert_host(
        host_id,
        inventory,
        inventory_generation=generation,
        boot_id=boot_id,
        agent_address=f"{host_id}:50052",
        now_ms=now_ms,
    )


async def commit(
    store: RedisStateStore,
    placement_id: str,
    slots: list[str],
    *,
    host_id: str = H,
    generation: int | None = None,
    request_id: str | None = None,
) -> CommitResult:
    if generation is None:
        record = await store.get_host(host_id)
        generation = record.alloc_generation if record else 0
    return await store.commit_reservation(
        host_id=host_id,
        expected_alloc_generation=generation,
        slots=slots,
        placement_id=placement_id,
        placement=b"payload-" + placement_id.encode(),
        request_id=request_id or f"req-{placement_id}",
        request_digest=f"digest-{placement_id}",
    )


async def dump(client: aioredis.Redis) -> dict[bytes | str, object]:
    """Every key with its value, to prove that nothing was written."""
    out: dict[bytes | str, object] = {}
    for key in sorted(await client.keys("*")):
        kind = await client.type(key)
        if kind == b"hash":
            out[key] = await client.hgetall(key)
        elif kind == b"set":
            out[key] = await client.smembers(key)
        else:
            out[key] = await client.get(key)
    return out


# -- hosts -------------------------------------------------------------------


def test_a_registered_host_reads_back(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert await store.get_host(H) is None
        assert await register(store)
        record = await store.get_host(H)
        assert record is not None
        assert record.host_id == H
        assert record.inventory == INVENTORY
        assert record.agent_address == f"{H}:50052"
        assert record.boot_id == "boot-1"
        assert record.inventory_generation == 1
        assert record.last_heartbeat_ms == 1000
        assert record.alloc_generation == 0
        assert record.allocations == {}
        snap = await store.snapshot()
        assert snap.hosts == {H: record}

    arun(body())


def test_a_stale_report_of_the_same_boot_changes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert await register(store, generation=5, inventory=b"new")
        before = await dump(redis_client)
        assert not await register(store, generation=4, inventory=b"old", now_ms=9999)
        assert await dump(redis_client) == before
        # The same generation again is a refresh, not stale.
        assert await register(store, generation=5, inventory=b"new", now_ms=2000)
        record = await store.get_host(H)
        assert record is not None
        assert record.last_heartbeat_ms == 2000
        assert record.alloc_generation == 0  # same inventory: plans stay valid

    arun(body())


def test_a_new_boot_always_wins(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert await register(store, generation=7, boot_id="boot-1")
        assert await register(store, generation=1, boot_id="boot-2", inventory=b"rebooted")
        record = await store.get_host(H)
        assert record is not None
        assert (record.boot_id, record.inventory_generation) == ("boot-2", 1)
        assert record.inventory == b"rebooted"

    arun(body())


def test_an_inventory_change_invalidates_plans_made_before_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, generation=1)
        planned_at = 0
        assert await register(store, generation=2, inventory=b"one GPU fewer")
        result = await commit(store, "p1", ["iommu-group:1"], generation=planned_at)
        assert result.outcome is CommitOutcome.CONFLICT

    arun(body())


def test_a_heartbeat_needs_the_registered_boot(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert not await store.touch_host(H, "boot-1", 5000)
        assert await store.get_host(H) is None  # a heartbeat never creates a host
        await register(store)
        assert not await store.touch_host(H, "boot-0", 5000)
        assert await store.touch_host(H, "boot-1", 5000)
        record = await store.get_host(H)
        assert record is not None
        assert record.last_heartbeat_ms == 5000

    arun(body())


def test_host_ids_that_would_move_the_hash_tag_are_refused(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    store = RedisStateStore(redis_client)
    for bad in ("", "a{b}", "x}"):
        with pytest.raises(ValueError, match="host_id"):
            arun(register(store, bad))


def test_placement_and_request_ids_may_hold_any_characters(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        result = await commit(store, "pl {x}:1", ["iommu-group:1"], request_id="{req}/é")
        assert result.outcome is CommitOutcome.COMMITTED
        assert await store.placement_for_request("{req}/é") == ("pl {x}:1", "digest-pl {x}:1")
        assert await store.release(H, "pl {x}:1")
        assert await store.placement_for_request("{req}/é") is None

    arun(body())


# -- commit ------------------------------------------------------------------


def test_a_commit_writes_everything_and_bumps_the_generation(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        result = await commit(store, "p1", ["iommu-group:1", "iommu-group:2"], generation=0)
        assert result.outcome is CommitOutcome.COMMITTED
        assert result.placement_id == "p1"
        assert "generation now 1" in result.detail
        record = await store.get_host(H)
        assert record is not None
        assert record.alloc_generation == 1
        assert record.allocations == {"iommu-group:1": "p1", "iommu-group:2": "p1"}
        assert await store.get_placement("p1") == (H, b"payload-p1")
        assert await store.placement_for_request("req-p1") == ("p1", "digest-p1")
        assert await store.list_placements() == [(H, b"payload-p1")]
        owned = await redis_client.hget(schema.placement_slots(H), "p1")
        assert owned is not None
        assert json.loads(owned) == ["iommu-group:1", "iommu-group:2"]

    arun(body())


def test_a_moved_generation_is_a_conflict_and_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "p1", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        before = await dump(redis_client)
        result = await commit(store, "p2", ["iommu-group:2"], generation=0)
        assert result.outcome is CommitOutcome.CONFLICT
        assert result.placement_id == "p2"
        assert "generation" in result.detail
        assert "is 1" in result.detail
        assert "expected 0" in result.detail
        assert await dump(redis_client) == before

    arun(body())


def test_a_taken_slot_is_a_conflict_naming_the_owner(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        result = await commit(store, "p2", ["iommu-group:1"])
        assert result.outcome is CommitOutcome.CONFLICT
        assert "iommu-group:1" in result.detail
        assert "p1" in result.detail

    arun(body())


def test_a_commit_is_all_or_nothing(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:3"])
        before = await dump(redis_client)
        slots = ["iommu-group:1", "iommu-group:2", "iommu-group:3", "iommu-group:4"]
        result = await commit(store, "p2", slots)
        assert result.outcome is CommitOutcome.CONFLICT
        assert "iommu-group:3" in result.detail
        assert await dump(redis_client) == before
        assert await store.get_placement("p2") is None
        assert await store.placement_for_request("req-p2") is None

    arun(body())


def test_an_unknown_host_is_a_conflict(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        result = await commit(store, "p1", ["iommu-group:1"], host_id="nowhere", generation=0)
        assert result.outcome is CommitOutcome.CONFLICT
        assert "not registered" in result.detail
        assert await dump(redis_client) == {}

    arun(body())


def test_a_placement_id_is_never_overwritten(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await register(store, "host-b")
        await commit(store, "p1", ["iommu-group:1"])
        result = await commit(store, "p1", ["iommu-group:1"], host_id="host-b", request_id="r2")
        assert result.outcome is CommitOutcome.CONFLICT
        assert "already in use" in result.detail
        assert await store.get_placement("p1") == (H, b"payload-p1")

    arun(body())


def test_a_duplicate_request_returns_the_existing_placement(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await register(store, "host-b")
        first = await commit(store, "p1", ["iommu-group:1"], request_id="req")
        assert first.outcome is CommitOutcome.COMMITTED
        before = await dump(redis_client)
        # A retry planned against the old generation, even on another host.
        again = await commit(store, "p9", ["iommu-group:7"], generation=0, request_id="req")
        assert again == CommitResult(CommitOutcome.DUPLICATE, "p1", again.detail)
        elsewhere = await commit(store, "p8", ["iommu-group:1"], host_id="host-b", request_id="req")
        assert elsewhere.outcome is CommitOutcome.DUPLICATE
        assert elsewhere.placement_id == "p1"
        assert await dump(redis_client) == before

    arun(body())


def test_the_script_is_reloaded_after_the_server_forgets_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await redis_client.script_flush()  # as after a server restart
        assert (await commit(store, "p1", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED

    arun(body())


def test_sixteen_racers_for_one_slot_yield_exactly_one_commit(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        start = asyncio.Event()

        async def racer(i: int) -> CommitResult:
            await start.wait()
            return await commit(store, f"p{i}", ["iommu-group:1"], generation=0)

        tasks = [asyncio.create_task(racer(i)) for i in range(16)]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)
        won = [r for r in results if r.outcome is CommitOutcome.COMMITTED]
        assert len(won) == 1
        assert all(r.outcome is CommitOutcome.CONFLICT for r in results if r is not won[0])
        record = await store.get_host(H)
        assert record is not None
        assert record.allocations == {"iommu-group:1": won[0].placement_id}
        assert record.alloc_generation == 1
        assert len(await store.list_placements()) == 1

    arun(body())


def test_sixteen_retries_of_one_request_yield_one_placement(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        # Different slots, so only idempotency (not the slot) can stop them;
        # each racer reads the generation itself, so some see it moved.
        results = await asyncio.gather(
            *(commit(store, f"p{i}", [f"iommu-group:{i}"], request_id="same") for i in range(16))
        )
        won = [r for r in results if r.outcome is CommitOutcome.COMMITTED]
        assert len(won) == 1
        assert all(
            r.outcome is not CommitOutcome.DUPLICATE or r.placement_id == won[0].placement_id
            for r in results
        )
        assert len(await store.list_placements()) == 1

    arun(body())


# -- update and release ------------------------------------------------------


def test_update_replaces_the_payload_only(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        assert await store.placement_state(H, "p1") == "pending"
        assert await store.update_placement(H, "p1", b"ready", state="ready")
        assert await store.get_placement("p1") == (H, b"ready")
        assert await store.placement_state(H, "p1") == "ready"
        record = await store.get_host(H)
        assert record is not None
        assert record.alloc_generation == 1  # a state change frees and takes nothing
        assert await store.release(H, "p1")
        assert not await store.update_placement(H, "p1", b"zombie", state="ready")
        assert await store.get_placement("p1") is None
        assert await redis_client.hgetall(schema.placements(H)) == {}
        assert await redis_client.hgetall(schema.placement_states(H)) == {}

    arun(body())


def test_state_changes_and_release_are_compare_and_set(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        # A release that expects a prepared placement must not free a pending one.
        assert not await store.release(H, "p1", from_states=["ready", "failed"])
        assert not await store.update_placement(
            H, "p1", b"x", state="releasing", from_states=["ready"]
        )
        assert await store.placement_state(H, "p1") == "pending"
        assert await store.update_placement(H, "p1", b"r", state="ready", from_states=["pending"])
        assert await store.update_placement(
            H, "p1", b"x", state="releasing", from_states=["ready", "failed"]
        )
        assert await store.release(H, "p1", from_states=["releasing"])
        assert await store.get_placement("p1") is None

    arun(body())


def test_release_forgets_the_placement_and_frees_its_slots(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1", "iommu-group:2"])
        await commit(store, "p2", ["iommu-group:3"])
        assert await store.release(H, "p1")
        record = await store.get_host(H)
        assert record is not None
        assert record.allocations == {"iommu-group:3": "p2"}
        assert record.alloc_generation == 3
        assert await store.get_placement("p1") is None
        assert await store.placement_for_request("req-p1") is None
        assert await store.list_placements() == [(H, b"payload-p2")]
        assert not await store.release(H, "p1")
        assert not await store.release(H, "never")
        assert not await store.release("host-b", "p2")  # wrong host
        # The request id may be used again once released.
        again = await commit(store, "p3", ["iommu-group:1"], request_id="req-p1")
        assert again.outcome is CommitOutcome.COMMITTED

    arun(body())


def test_release_frees_only_the_slots_the_placement_still_owns(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1", "iommu-group:2"])
        # An operator moved a slot to another owner by hand.
        await redis_client.hset(schema.alloc(H), "iommu-group:2", "p-manual")
        assert await store.release(H, "p1")
        record = await store.get_host(H)
        assert record is not None
        assert record.allocations == {"iommu-group:2": "p-manual"}

    arun(body())


def test_placements_are_listed_in_id_order_and_by_host(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, "host-a")
        await register(store, "host-b")
        await commit(store, "pl-c", ["iommu-group:1"], host_id="host-a")
        await commit(store, "pl-a", ["iommu-group:1"], host_id="host-b")
        await commit(store, "pl-b", ["iommu-group:2"], host_id="host-a")
        everything = await store.list_placements()
        assert everything == [
            ("host-b", b"payload-pl-a"),
            ("host-a", b"payload-pl-b"),
            ("host-a", b"payload-pl-c"),
        ]
        assert await store.list_placements("host-a") == [
            ("host-a", b"payload-pl-b"),
            ("host-a", b"payload-pl-c"),
        ]
        assert await store.list_placements("host-z") == []
        snap = await store.snapshot()
        assert set(snap.hosts) == {"host-a", "host-b"}
        assert snap.hosts["host-b"].allocations == {"iommu-group:1": "pl-a"}

    arun(body())


def test_lookups_of_unknown_ids_find_nothing(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert await store.get_placement("nope") is None
        assert await store.get_placement("") is None
        assert await store.placement_for_request("nope") is None
        assert await store.list_placements() == []
        assert (await store.snapshot()).hosts == {}

    arun(body())


# -- schema ------------------------------------------------------------------


def test_every_key_is_prefixed_and_per_host_keys_share_one_slot(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        keys = {k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")}
        assert all(k.startswith(schema.PREFIX) for k in keys)
        per_host = {k for k in keys if "{" in k}
        assert per_host == {
            *schema.host_keys(H),
            schema.placement_states(H),
            schema.placement_tenants(H),
        }
        assert len({key_slot(k.encode()) for k in per_host}) == 1
        assert keys - per_host == {
            schema.HOSTS,
            schema.request("req-p1"),
            schema.placement_index("p1"),
        }

    arun(body())
