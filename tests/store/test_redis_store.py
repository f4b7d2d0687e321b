"""RedisStateStore: registry, atomic commit, idempotency and release on a real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from tessera.scheduler.store import redis_store, schema
from tessera.scheduler.store.redis_store import (
    ClaimOutcome,
    CommitOutcome,
    CommitResult,
    RecordSweep,
    RedisStateStore,
    RequestClaim,
)

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


def pid(token: str, host_id: str = H) -> str:
    """The placement id of ``token`` on a host (ids name their host)."""
    return schema.placement_id(token, host_id)


async def claim(
    store: RedisStateStore, request_id: str, claimant: str, digest: str = ""
) -> RequestClaim:
    return await store.claim_request(request_id, digest or f"digest-{request_id}", claimant)


async def commit(
    store: RedisStateStore,
    token: str,
    slots: list[str],
    *,
    host_id: str = H,
    seen: Mapping[str, int] | None = None,
    request_id: str | None = None,
    claimant: str | None = None,
) -> CommitResult:
    """Claim the request (unless ``claimant`` already holds it), then commit.

    The plan is taken to have seen the host's guard versions ``seen`` (None:
    as the store holds them now); it guards the epoch, exclusive holds and
    the IOMMU groups it takes, as :mod:`scheduler.core.guards` names them.
    """
    if seen is None:
        record = await store.get_host(host_id)
        seen = record.versions if record else {}
    groups = [f"group:{s.split(':', 1)[1]}" for s in slots if s.startswith("iommu-group:")]
    keys = {"epoch", "exclusive", *groups}
    request_id = request_id or f"req-{token}"
    if claimant is None:
        claimant = f"call-{token}"
        assert (await claim(store, request_id, claimant)).outcome is ClaimOutcome.CLAIMED
    placement_id = pid(token, host_id)
    return await store.commit_reservation(
        host_id=host_id,
        guards={key: seen.get(key, 0) for key in keys},
        bumps=sorted(set(groups)),
        slots=slots,
        placement_id=placement_id,
        placement=b"payload-" + placement_id.encode(),
        request_id=request_id,
        claimant=claimant,
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
        elif kind == b"stream":
            out[key] = await client.xrange(key)
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
        planned_at = (await store.get_host(H)).versions  # type: ignore[union-attr]
        assert await register(store, generation=2, inventory=b"one GPU fewer")
        result = await commit(store, "p1", ["iommu-group:1"], seen=planned_at)
        assert result.outcome is CommitOutcome.CONFLICT
        assert "epoch" in result.detail

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
        result = await commit(store, "x {y}:1", ["iommu-group:1"], request_id="{req}/é")
        assert result.outcome is CommitOutcome.COMMITTED
        p1 = pid("x {y}:1")
        assert await store.placement_for_request("{req}/é") == (p1, "digest-{req}/é")
        assert await store.get_placement(p1) == (H, b"payload-" + p1.encode())
        assert await store.release(H, p1)
        assert await store.placement_for_request("{req}/é") is None

    arun(body())


def test_placement_ids_name_their_host() -> None:
    assert schema.placement_id("3f2a", "gpu-07.rack:2") == "pl-3f2a@gpu-07.rack:2"
    assert schema.host_of_placement("pl-3f2a@gpu-07.rack:2") == "gpu-07.rack:2"
    assert schema.host_of_placement("pl-3f2a@user@host") == "user@host"
    for foreign in ("p1", "pl-@h", "pl-x", "x-1@h", ""):
        assert schema.host_of_placement(foreign) is None, foreign
    for bad in ("", "a@b"):
        with pytest.raises(ValueError, match="token"):
            schema.placement_id(bad, H)


# -- commit ------------------------------------------------------------------


def test_a_commit_writes_everything_and_bumps_the_generation(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        result = await commit(store, "p1", ["iommu-group:1", "iommu-group:2"], seen={})
        p1 = pid("p1")
        assert result.outcome is CommitOutcome.COMMITTED
        assert result.placement_id == p1
        assert "generation now 1" in result.detail and result.alloc_generation == 1
        record = await store.get_host(H)
        assert record is not None
        assert record.alloc_generation == 1
        # The devices it took moved on, and so did the host's tenants (a new one).
        versions = dict(record.versions)
        assert versions.pop("incarnation") > 0  # set when the record was created
        assert versions == {"group:1": 1, "group:2": 1, "tenants": 1}
        assert record.allocations == {"iommu-group:1": p1, "iommu-group:2": p1}
        assert await store.get_placement(p1) == (H, b"payload-" + p1.encode())
        assert await store.placement_for_request("req-p1") == (p1, "digest-req-p1")
        assert await store.list_placements() == [(H, b"payload-" + p1.encode())]
        owned = await redis_client.hget(schema.placement_slots(H), p1)
        assert owned is not None
        assert json.loads(owned) == ["iommu-group:1", "iommu-group:2"]
        # The request record is finalized: committed, naming the placement.
        recorded = await redis_client.hgetall(schema.request("req-p1"))
        assert recorded == {
            b"state": b"committed",
            b"digest": b"digest-req-p1",
            b"placement_id": p1.encode(),
            b"host_id": H.encode(),
        }

    arun(body())


def test_a_placement_id_must_name_the_host_it_is_committed_on(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await claim(store, "r1", "me")
        with pytest.raises(ValueError, match="does not name host"):
            await store.commit_reservation(
                host_id=H,
                guards={},
                bumps=[],
                slots=["iommu-group:1"],
                placement_id=pid("p1", "host-b"),
                placement=b"x",
                request_id="r1",
                claimant="me",
            )
        assert await store.list_placements() == []

    arun(body())


def test_a_plan_for_another_device_of_a_host_that_moved_still_commits(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "p1", ["iommu-group:1"], seen={})).outcome is (
            CommitOutcome.COMMITTED
        )
        # Planned before p1 landed, on the other GPU: p1 changed nothing it relied on.
        result = await commit(store, "p2", ["iommu-group:2"], seen={})
        assert result.outcome is CommitOutcome.COMMITTED and result.alloc_generation == 2

    arun(body())


def test_a_moved_device_is_a_conflict_and_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        assert (await commit(store, "p1", ["iommu-group:1"])).outcome is CommitOutcome.COMMITTED
        assert await store.release(H, pid("p1"))  # the group is free again, at version 2
        await claim(store, "req-p2", "me")
        before = await dump(redis_client)
        result = await commit(store, "p2", ["iommu-group:1"], seen={}, claimant="me")
        assert result.outcome is CommitOutcome.CONFLICT
        assert result.placement_id == pid("p2")
        assert "group:1" in result.detail
        assert "version 2" in result.detail
        assert "saw 0" in result.detail
        after = await dump(redis_client)
        # Only the claim's intent moved (it names the attempt); the host is untouched.
        assert {k: v for k, v in after.items() if k != schema.request("req-p2").encode()} == {
            k: v for k, v in before.items() if k != schema.request("req-p2").encode()
        }

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
        assert pid("p1") in result.detail

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
        host_keys = {k for k in before if b"{" in k}
        after = await dump(redis_client)
        assert {k: after[k] for k in host_keys} == {k: before[k] for k in host_keys}
        assert await store.get_placement(pid("p2")) is None
        assert await store.placement_for_request("req-p2") is None

    arun(body())


def test_an_unknown_host_is_a_conflict(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        result = await commit(store, "p1", ["iommu-group:1"], host_id="nowhere", seen={})
        assert result.outcome is CommitOutcome.CONFLICT
        assert "not registered" in result.detail
        # Only the request's claim exists; it is dropped when the caller gives up.
        assert set(await dump(redis_client)) == {schema.request("req-p1").encode()}
        assert await store.abandon_claim("req-p1", "call-p1")
        assert await dump(redis_client) == {}

    arun(body())


def test_a_placement_id_is_never_overwritten(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        result = await commit(store, "p1", ["iommu-group:2"], request_id="r2")
        assert result.outcome is CommitOutcome.CONFLICT
        assert "already in use" in result.detail
        assert await store.get_placement(pid("p1")) == (H, b"payload-" + pid("p1").encode())

    arun(body())


# -- request claims ----------------------------------------------------------


def test_a_request_id_is_claimed_once_and_then_answers_with_its_placement(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await register(store, "host-b")
        assert await claim(store, "req", "a") == RequestClaim(ClaimOutcome.CLAIMED, "digest-req")
        # The same call again renews; another call finds it busy.
        assert (await claim(store, "req", "a")).outcome is ClaimOutcome.CLAIMED
        assert await claim(store, "req", "b") == RequestClaim(ClaimOutcome.BUSY, "digest-req")
        first = await commit(store, "p1", ["iommu-group:1"], request_id="req", claimant="a")
        assert first.outcome is CommitOutcome.COMMITTED
        before = await dump(redis_client)
        # A retry (any call, any digest) is told what the first call made.
        assert await claim(store, "req", "c") == RequestClaim(
            ClaimOutcome.DUPLICATE, "digest-req", pid("p1")
        )
        again = await claim(store, "req", "d", digest="other")
        assert again.digest == "digest-req"  # the caller sees the id was reused
        # Committing without the claim writes nothing.
        lost = await commit(store, "p9", ["iommu-group:7"], request_id="req", claimant="c")
        assert lost.outcome is CommitOutcome.LOST
        elsewhere = await commit(
            store, "p8", ["iommu-group:1"], host_id="host-b", request_id="req", claimant="c"
        )
        assert elsewhere.outcome is CommitOutcome.LOST
        assert await dump(redis_client) == before

    arun(body())


def test_a_stale_claim_whose_commit_landed_is_adopted(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client, claim_ttl_ms=100, claim_skew_ms=0)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"], request_id="req")
        # What a caller that died between the host commit and finalize leaves.
        await redis_client.hset(
            schema.request("req"), mapping={"state": "claimed", "claimant": "dead"}
        )
        await redis_client.hset(schema.request("req"), "deadline_ms", 1)
        got = await claim(store, "req", "next")
        assert got == RequestClaim(ClaimOutcome.DUPLICATE, "digest-req", pid("p1"))
        assert await redis_client.hget(schema.request("req"), "state") == b"committed"

    arun(body())


def test_a_stale_claim_that_never_landed_is_taken_over_and_its_commit_refused(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client, claim_ttl_ms=50, claim_skew_ms=0)
        await register(store)
        assert (await claim(store, "req", "slow")).outcome is ClaimOutcome.CLAIMED
        assert (await claim(store, "req", "next")).outcome is ClaimOutcome.BUSY
        await asyncio.sleep(0.1)
        assert (await claim(store, "req", "next")).outcome is ClaimOutcome.CLAIMED
        late = await commit(store, "p1", ["iommu-group:1"], request_id="req", claimant="slow")
        assert late.outcome is CommitOutcome.LOST
        won = await commit(store, "p2", ["iommu-group:1"], request_id="req", claimant="next")
        assert won.outcome is CommitOutcome.COMMITTED
        assert await store.list_placements() == [(H, b"payload-" + pid("p2").encode())]

    arun(body())


def test_the_host_refuses_a_commit_past_the_claims_deadline(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """A caller that stalls between recording its intent and the host commit."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        script = redis_client.register_script(redis_store._COMMIT_LUA)
        keys = [*schema.all_host_keys(H), *schema.feed_keys(H)]
        seconds, _ = await redis_client.time()
        past = int(seconds) * 1000 - 1000
        # No guards, no bumps, one slot: only the deadline can refuse it.
        reply = await script(
            keys=keys, args=[pid("p1"), b"x", "req", H, "t", past, 0, 0, "iommu-group:1"]
        )
        assert reply[0] == b"EXPIRED"
        assert b"expired" in reply[2]
        assert await store.list_placements() == []

    arun(body())


def test_sixteen_calls_for_one_request_id_claim_it_once(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        results = await asyncio.gather(*(claim(store, "same", f"c{i}") for i in range(16)))
        outcomes = sorted(r.outcome.value for r in results)
        assert outcomes == ["BUSY"] * 15 + ["CLAIMED"]

    arun(body())


def test_a_record_its_release_could_not_forget_is_forgotten_by_the_sweep(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"], request_id="cut")
        await commit(store, "p2", ["iommu-group:2"], request_id="held")
        record = await redis_client.hmget(schema.request("cut"), ["state", "placement_id"])
        assert record == [b"committed", pid("p1").encode()], record
        # The release freed the host, then the store went away before its
        # second step (the record is in another slot): the record stays.
        assert await store.release(H, pid("p1")) > 0
        await redis_client.hset(
            schema.request("cut"),
            mapping={"state": "committed", "placement_id": pid("p1"), "host_id": H},
        )
        assert await store.sweep_request_records() == RecordSweep(0, 1)
        assert not await redis_client.exists(schema.request("cut"))
        assert await redis_client.hget(schema.request("held"), "state") == b"committed"
        # The request id is free for a new placement, which the sweep keeps.
        assert (await claim(store, "cut", "again")).outcome is ClaimOutcome.CLAIMED
        await commit(store, "p3", ["iommu-group:1"], request_id="cut", claimant="again")
        assert await store.sweep_request_records() == RecordSweep(0, 0)
        assert await redis_client.hget(schema.request("cut"), "placement_id") == pid("p3").encode()

    arun(body())


def test_the_sweep_reads_records_page_by_page_and_misses_none(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "kept", ["iommu-group:1"], request_id="kept")
        # More records than a page, each naming a placement its host lost.
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(1_234):
                pipe.hset(
                    schema.request(f"gone-{i}"),
                    mapping={"state": "committed", "placement_id": pid(f"g{i}"), "host_id": H},
                )
            await pipe.execute()
        assert await store.sweep_request_records() == RecordSweep(0, 1_234)
        assert await redis_client.keys(schema.request("*")) == [schema.request("kept").encode()]

    arun(body())


def test_stale_claims_are_resolved_by_the_sweep(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client, claim_ttl_ms=50, claim_skew_ms=0)
        await register(store)
        # landed: committed on the host, never finalized.
        await commit(store, "p1", ["iommu-group:1"], request_id="landed")
        await redis_client.hset(
            schema.request("landed"), mapping={"state": "claimed", "claimant": "dead"}
        )
        await redis_client.hset(schema.request("landed"), "deadline_ms", 1)
        # lost: claimed with an intent whose commit never happened.
        await claim(store, "lost", "dead")
        await redis_client.hset(
            schema.request("lost"), mapping={"placement_id": pid("p2"), "host_id": H}
        )
        await asyncio.sleep(0.1)
        await claim(store, "live", "alive")  # within its deadline
        await commit(store, "p3", ["iommu-group:3"], request_id="done")  # committed
        assert await store.sweep_request_records() == RecordSweep(2, 0)
        assert await redis_client.hget(schema.request("landed"), "state") == b"committed"
        assert not await redis_client.exists(schema.request("lost"))
        assert await redis_client.hget(schema.request("live"), "state") == b"claimed"
        assert await redis_client.hget(schema.request("done"), "state") == b"committed"
        assert await store.sweep_request_records() == RecordSweep(0, 0)

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
            return await commit(store, f"p{i}", ["iommu-group:1"], seen={})

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


# -- update and release ------------------------------------------------------


def test_update_replaces_the_payload_only(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        p1 = pid("p1")
        assert await store.placement_state(H, p1) == "pending"
        assert await store.update_placement(H, p1, b"ready", state="ready")
        assert await store.get_placement(p1) == (H, b"ready")
        assert await store.placement_state(H, p1) == "ready"
        record = await store.get_host(H)
        assert record is not None
        assert record.alloc_generation == 1  # a state change frees and takes nothing
        assert await store.release(H, p1)
        assert not await store.update_placement(H, p1, b"zombie", state="ready")
        assert await store.get_placement(p1) is None
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
        p1 = pid("p1")
        # A release that expects a prepared placement must not free a pending one.
        assert not await store.release(H, p1, from_states=["ready", "failed"])
        assert not await store.update_placement(
            H, p1, b"x", state="releasing", from_states=["ready"]
        )
        assert await store.placement_state(H, p1) == "pending"
        assert await store.update_placement(H, p1, b"r", state="ready", from_states=["pending"])
        assert await store.update_placement(
            H, p1, b"x", state="releasing", from_states=["ready", "failed"]
        )
        assert await store.release(H, p1, from_states=["releasing"])
        assert await store.get_placement(p1) is None

    arun(body())


def test_a_release_sent_again_after_its_reply_was_lost_still_forgets_the_request(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """The first run freed the placement; the reply never came, so it ran again.

    The second run finds no placement; the request record that still names it
    (the first run was cut off before forgetting it) must not outlive it.
    """

    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        p1 = pid("p1")
        record: dict[Any, Any] = dict(await redis_client.hgetall(schema.request("req-p1")))
        assert await store.release(H, p1)
        # As a release cut off between freeing the slots and forgetting the
        # request would have left the store.
        await redis_client.hset(schema.request("req-p1"), mapping=record)
        assert not await store.release(H, p1, request="req-p1")
        assert not await redis_client.exists(schema.request("req-p1"))
        # A record naming another placement is left alone.
        await redis_client.hset(schema.request("req-p1"), mapping={**record, b"placement_id": b"x"})
        assert not await store.release(H, p1, request="req-p1")
        assert await redis_client.exists(schema.request("req-p1"))

    arun(body())


def test_release_forgets_the_placement_and_frees_its_slots(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1", "iommu-group:2"])
        await commit(store, "p2", ["iommu-group:3"])
        p1, p2 = pid("p1"), pid("p2")
        assert await store.release(H, p1)
        record = await store.get_host(H)
        assert record is not None
        assert record.allocations == {"iommu-group:3": p2}
        assert record.alloc_generation == 3
        assert await store.get_placement(p1) is None
        assert await store.placement_for_request("req-p1") is None
        assert not await redis_client.exists(schema.request("req-p1"))
        assert await store.list_placements() == [(H, b"payload-" + p2.encode())]
        assert not await store.release(H, p1)
        assert not await store.release(H, "never")
        assert not await store.release("host-b", p2)  # wrong host
        # The request id may be used again once released.
        again = await commit(store, "p3", ["iommu-group:1"], request_id="req-p1")
        assert again.outcome is CommitOutcome.COMMITTED

    arun(body())


def test_a_record_left_by_a_release_cut_short_frees_its_request_id(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"], request_id="req")
        left = await redis_client.hgetall(schema.request("req"))
        assert await store.release(H, pid("p1"))
        # The release died between freeing the host's slots and forgetting the record.
        for field, value in left.items():
            await redis_client.hset(schema.request("req"), field, value)
        assert await store.placement_for_request("req") is None
        assert await claim(store, "req", "retry") == RequestClaim(
            ClaimOutcome.CLAIMED, "digest-req"
        )

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
        assert await store.release(H, pid("p1"))
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
        await commit(store, "c", ["iommu-group:1"], host_id="host-a")
        await commit(store, "a", ["iommu-group:1"], host_id="host-b")
        await commit(store, "b", ["iommu-group:2"], host_id="host-a")
        everything = await store.list_placements()
        assert everything == [
            ("host-b", b"payload-pl-a@host-b"),
            ("host-a", b"payload-pl-b@host-a"),
            ("host-a", b"payload-pl-c@host-a"),
        ]
        assert await store.list_placements("host-a") == [
            ("host-a", b"payload-pl-b@host-a"),
            ("host-a", b"payload-pl-c@host-a"),
        ]
        assert await store.list_placements("host-z") == []
        snap = await store.snapshot()
        assert set(snap.hosts) == {"host-a", "host-b"}
        assert snap.hosts["host-b"].allocations == {"iommu-group:1": "pl-a@host-b"}

    arun(body())


def test_lookups_of_unknown_ids_find_nothing(redis_client: aioredis.Redis, arun: Runner) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        assert await store.get_placement("nope") is None
        assert await store.get_placement("") is None
        assert await store.get_placement("pl-x@{bad}") is None
        assert await store.get_placement(pid("x", "unknown-host")) is None
        assert await store.placement_for_request("nope") is None
        assert await store.list_placements() == []
        assert (await store.snapshot()).hosts == {}

    arun(body())


# -- schema ------------------------------------------------------------------


def test_every_key_is_prefixed_and_a_hosts_keys_share_one_slot_with_its_feed(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store)
        await commit(store, "p1", ["iommu-group:1"])
        token = await store.acquire_lease("reaper", "me", 10_000)
        keys = {k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")}
        assert all(k.startswith(schema.PREFIX) for k in keys)
        per_host = {k for k in keys if k.startswith(schema.host(H).removesuffix("host"))}
        assert per_host == set(schema.all_host_keys(H))
        feed = set(schema.feed_keys(H))
        assert feed <= keys
        assert len({key_slot(k.encode()) for k in per_host | feed}) == 1
        job = {schema.lease("reaper"), schema.fence("reaper")}
        assert token and job <= keys
        assert len({key_slot(k.encode()) for k in job}) == 1
        assert keys - per_host - feed - job == {schema.HOSTS, schema.request("req-p1")}

    arun(body())


def test_a_snapshot_leaves_out_inventories_the_reader_holds(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, "host-a", generation=1)
        await register(store, "host-b", generation=1)
        await register(store, "host-c", generation=1)
        await commit(store, "p1", ["iommu-group:1"], host_id="host-b")
        snap = await store.snapshot({"host-a": ("boot-1", 1), "host-b": ("boot-0", 1)})
        assert snap.hosts["host-a"].inventory == b""  # held: left out
        assert snap.hosts["host-b"].inventory == INVENTORY  # another boot: sent
        assert snap.hosts["host-c"].inventory == INVENTORY  # unknown: sent
        assert snap.hosts["host-b"].allocations == {"iommu-group:1": pid("p1", "host-b")}
        bare = await store.snapshot(inventories=False)
        assert {h: r.inventory for h, r in bare.hosts.items()} == dict.fromkeys(snap.hosts, b"")
        assert bare.hosts["host-a"].boot_id == "boot-1"
        assert bare.hosts["host-b"].alloc_generation == 1
        # A newer report of a held host is sent again.
        await register(store, "host-a", generation=2, inventory=b"new")
        again = await store.snapshot({"host-a": ("boot-1", 1)})
        assert again.hosts["host-a"].inventory == b"new"

    arun(body())
