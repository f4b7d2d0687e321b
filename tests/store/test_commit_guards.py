"""Commits check what their plan touched: devices, the host's epoch, exclusive holds, tenants.

Two plans made on the same state of a host both commit when neither depends
on what the other changes (different devices); when one does, whichever
commits second conflicts, in either order. The guard keys come from the pure
core (:mod:`scheduler.core.guards`), the checks from the Lua applier.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from scheduler.core import guards
from scheduler.core.host import HostView
from scheduler.core.identity import SlotKey
from scheduler.service.convert import host_view_from_inventory
from scheduler.service.coordinator import PlacementCoordinator
from scheduler.store import schema
from scheduler.store.redis_store import CommitOutcome, CommitResult, RedisStateStore

from ..conftest import Runner
from ..scheduler.service.test_cluster_model import two_gpu_host
from ..scheduler.service.test_housekeeping import Clock, Host, gpu

H = "h1"


def view() -> HostView:
    """h1: two GPUs, in IOMMU groups 1 (0000:01:00.0) and 2 (0000:02:00.0)."""
    return host_view_from_inventory(two_gpu_host(H))


async def plan_and_commit(
    store: RedisStateStore,
    token: str,
    slots: list[str],
    seen: dict[str, int],
    *,
    tenant: str,
    exclusive: bool = False,
) -> CommitResult:
    """Commit a plan made when the host's versions were ``seen``, as the coordinator does."""
    keys = guards.guards(view(), [SlotKey(s) for s in slots], exclusive=exclusive)
    request_id = f"req-{token}"
    await store.claim_request(request_id, "digest", f"call-{token}")
    return await store.commit_reservation(
        host_id=H,
        guards={key: seen.get(key, 0) for key in keys},
        bumps=guards.changed_by(view(), [SlotKey(s) for s in slots]),
        slots=slots,
        placement_id=schema.placement_id(token, H),
        placement=b"payload",
        request_id=request_id,
        claimant=f"call-{token}",
        tenant=tenant,
    )


async def registered(store: RedisStateStore) -> dict[str, int]:
    """Register h1; the versions a plan made now would see."""
    await store.upsert_host(
        H,
        two_gpu_host(H).SerializeToString(),
        inventory_generation=1,
        boot_id="b1",
        agent_address="agent:1",
        now_ms=1,
    )
    record = await store.get_host(H)
    assert record is not None
    return dict(record.versions)


def test_slots_of_one_physical_device_share_its_version_whatever_their_form() -> None:
    v = view()
    assert guards.device_key(v, SlotKey("iommu-group:1")) == "group:1"
    assert guards.device_key(v, SlotKey("vf:0000:01:00.0#3")) == "group:1"
    assert guards.device_key(v, SlotKey("mdev:0000:01:00.0#nvidia-63#u-1")) == "group:1"
    assert guards.device_key(v, SlotKey("mig:0000:02:00.0#19@0+1")) == "group:2"
    assert guards.device_key(v, SlotKey("exclusive:host:h1#r1")) is None
    assert guards.changed_by(v, [SlotKey("iommu-group:2"), SlotKey("exclusive:host:h1#r1")]) == (
        guards.EXCLUSIVE,
        "group:2",
    )
    # A device the view does not know is still guarded, by its address.
    assert guards.device_key(v, SlotKey("vf:0000:99:00.0#0")) == "device:0000:99:00.0"


def test_plans_for_different_devices_made_on_one_state_both_commit(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        seen = await registered(store)
        first = await plan_and_commit(store, "a", ["iommu-group:1"], seen, tenant="acme")
        second = await plan_and_commit(store, "b", ["iommu-group:2"], seen, tenant="acme")
        assert (first.outcome, second.outcome) == (CommitOutcome.COMMITTED,) * 2

    arun(body())


@pytest.mark.parametrize("exclusive_first", [True, False])
def test_an_exclusive_hold_and_another_tenant_planned_on_one_state_never_both_commit(
    redis_client: aioredis.Redis, arun: Runner, exclusive_first: bool
) -> None:
    """Tenant A holds the host exclusively; tenant B takes the other GPU: one of them loses."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        seen = await registered(store)

        async def holder() -> CommitResult:
            slots = ["iommu-group:1", "exclusive:host:h1#req-a"]
            return await plan_and_commit(store, "a", slots, seen, tenant="a", exclusive=True)

        async def other() -> CommitResult:
            return await plan_and_commit(store, "b", ["iommu-group:2"], seen, tenant="b")

        order = (holder, other) if exclusive_first else (other, holder)
        first, second = [await step() for step in order]
        assert first.outcome is CommitOutcome.COMMITTED
        assert second.outcome is CommitOutcome.CONFLICT
        assert ("exclusive" if exclusive_first else "tenants") in second.detail

    arun(body())


def test_the_same_tenant_adding_to_a_host_does_not_disturb_its_exclusive_plan(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await registered(store)
        assert (await plan_and_commit(store, "a", ["iommu-group:2"], {}, tenant="a")).outcome is (
            CommitOutcome.COMMITTED
        )
        seen = dict((await store.get_host(H)).versions)  # type: ignore[union-attr]
        # More of tenant a's own on the host: the tenants it has do not change.
        slots = ["iommu-group:1", "exclusive:host:h1#req-b"]
        held = await plan_and_commit(store, "b", slots, seen, tenant="a", exclusive=True)
        assert held.outcome is CommitOutcome.COMMITTED

    arun(body())


def test_one_replica_places_concurrently_on_one_host_without_racing_itself(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Both GPUs of the only host, asked for at once: the second plan assumes the first."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        coordinator = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await coordinator.register(two_gpu_host(H), "agent:1")
        await coordinator.refreshed()
        placed = await asyncio.gather(coordinator.place(gpu("r1")), coordinator.place(gpu("r2")))
        assert {p.host_id for p in placed} == {H}
        assert coordinator.commit_outcomes == {"COMMITTED": 2}
        record = await store.get_host(H)
        assert record is not None and len(record.allocations) == 2

    arun(body())
