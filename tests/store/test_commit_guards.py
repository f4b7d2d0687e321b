"""Commits check what their plan touched: devices, the host's epoch, exclusive holds, tenants.

Two plans made on the same state of a host both commit when neither depends
on what the other changes (different devices); when one does, whichever
commits second conflicts, in either order. The guard keys come from the pure
core (:mod:`scheduler.core.guards`), the checks from the Lua applier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.core import guards
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import CommitOutcome, CommitResult, RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

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
    seen: Mapping[str, int],
    *,
    tenant: str,
    exclusive: bool = False,
) -> CommitResult:
    """Commit a plan on h1 made when the host's versions were ``seen``, as the coordinator does."""
    return await commit_on(
        store, two_gpu_host(H), token, slots, seen, tenant=tenant, exclusive=exclusive
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
    assert guards.device_keys(v, SlotKey("iommu-group:1")) == {"group:1"}
    assert guards.device_keys(v, SlotKey("vf:0000:01:00.0#3")) == {"group:1"}
    assert guards.device_keys(v, SlotKey("mdev:0000:01:00.0#nvidia-63#u-1")) == {"group:1"}
    assert guards.device_keys(v, SlotKey("mig:0000:02:00.0#19@0+1")) == {"group:2"}
    assert guards.device_keys(v, SlotKey("exclusive:host:h1#r1")) == set()
    assert guards.changed_by(v, [SlotKey("iommu-group:2"), SlotKey("exclusive:host:h1#r1")]) == (
        guards.EXCLUSIVE,
        "group:2",
    )
    # A device the view does not know is still guarded, by its address.
    assert guards.device_keys(v, SlotKey("vf:0000:99:00.0#0")) == {"device:0000:99:00.0"}


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


def test_two_plans_taking_host_cpu_made_on_one_state_never_both_commit(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Each fits what the host had when planned; together they might not: the second replans."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        seen = await registered(store)
        first = await plan_and_commit(
            store, "a", ["iommu-group:1", "host-share:24000,0#req-a"], seen, tenant="acme"
        )
        second = await plan_and_commit(
            store, "b", ["iommu-group:2", "host-share:24000,0#req-b"], seen, tenant="acme"
        )
        assert (first.outcome, second.outcome) == (CommitOutcome.COMMITTED, CommitOutcome.CONFLICT)
        assert guards.HOST_SHARE in second.detail

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
        # The hold guards every device of its domain (the host): the other
        # tenant's GPU moved; the other way round, the exclusive holds moved.
        assert ("exclusive" if exclusive_first else "group:2") in second.detail

    arun(body())


def test_the_same_tenant_adding_to_a_host_does_not_disturb_its_exclusive_plan(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await registered(store)
        first = await plan_and_commit(
            store, "a", ["iommu-group:2"], await versions_now(store), tenant="a"
        )
        assert first.outcome is CommitOutcome.COMMITTED
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


NUMA = placement_pb2.EXCLUSIVITY_DOMAIN_NUMA_NODE


def three_gpu_host(host_id: str = H, boot_id: str = "b1") -> inventory_pb2.HostInventory:
    """GPUs 01 and 02 on NUMA node 0, GPU 03 on node 1, each alone in its group."""
    return inventory_pb2.HostInventory(
        host_id=host_id, boot_id=boot_id, generation=1, iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address=f"0000:0{i}:00.0", vendor_id=0x10DE, device_id=0x2330,
                class_code=0x030200, iommu_group=i, has_iommu_group=True,
                role=inventory_pb2.PCI_ROLE_ENDPOINT, numa_node=0 if i < 3 else 1,
            )
            for i in (1, 2, 3)
        ],
        iommu_groups=[
            inventory_pb2.IommuGroup(number=i, members=[f"0000:0{i}:00.0"]) for i in (1, 2, 3)
        ],
        numa_nodes=[
            inventory_pb2.NumaNode(id=n, distances=[10 if m == n else 21 for m in (0, 1)])
            for n in (0, 1)
        ],
    )  # fmt: skip


async def commit_on(
    store: RedisStateStore,
    inventory: inventory_pb2.HostInventory,
    token: str,
    slots: list[str],
    seen: Mapping[str, int],
    *,
    tenant: str,
    exclusive: bool = False,
) -> CommitResult:
    """Commit a plan on ``inventory``'s host made when its versions were ``seen``."""
    v = host_view_from_inventory(inventory)
    request_id = f"req-{token}"
    await store.claim_request(request_id, "digest", f"call-{token}")
    return await store.commit_reservation(
        host_id=inventory.host_id,
        guards=guards.expected(v, seen, [SlotKey(s) for s in slots], exclusive=exclusive),
        bumps=guards.changed_by(v, [SlotKey(s) for s in slots]),
        slots=slots,
        placement_id=schema.placement_id(token, inventory.host_id),
        placement=b"payload",
        request_id=request_id,
        claimant=f"call-{token}",
        tenant=tenant,
    )


async def versions_now(store: RedisStateStore, host_id: str = H) -> dict[str, int]:
    record = await store.get_host(host_id)
    assert record is not None
    return dict(record.versions)


async def register(store: RedisStateStore, inventory: inventory_pb2.HostInventory) -> None:
    await store.upsert_host(
        inventory.host_id,
        inventory.SerializeToString(),
        inventory_generation=inventory.generation,
        boot_id=inventory.boot_id,
        agent_address="agent:1",
        now_ms=1,
    )


def test_an_exclusive_domain_hold_conflicts_with_a_tenant_already_on_the_host_arriving_in_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Beta is on NUMA node 1 already, then lands on node 0: alpha's stale hold of node 0 loses."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        host = three_gpu_host()
        await register(store, host)
        beta = await commit_on(
            store, host, "b0", ["iommu-group:3"], await versions_now(store), tenant="beta"
        )
        assert beta.outcome is CommitOutcome.COMMITTED
        alpha_saw = await versions_now(store)
        # Beta is not new to the host: the tenants version does not move.
        arrived = await commit_on(store, host, "b1", ["iommu-group:2"], alpha_saw, tenant="beta")
        assert arrived.outcome is CommitOutcome.COMMITTED
        assert (await versions_now(store)).get(guards.TENANTS) == alpha_saw.get(guards.TENANTS)
        slots = ["iommu-group:1", "exclusive:numa-node:0#req-a1"]
        hold = await commit_on(store, host, "a1", slots, alpha_saw, tenant="alpha", exclusive=True)
        assert hold.outcome is CommitOutcome.CONFLICT
        assert "group:2" in hold.detail

    arun(body())


def test_a_host_forgotten_and_registered_again_is_a_new_incarnation_no_old_plan_commits_on(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        await register(store, three_gpu_host())
        old = await versions_now(store)
        assert old[guards.INCARNATION] > 0
        assert (await store.forget_host(H)).outcome.name == "FORGOTTEN"
        await register(store, three_gpu_host(boot_id="b2"))
        new = await versions_now(store)
        assert new[guards.INCARNATION] != old[guards.INCARNATION]
        late = await commit_on(store, three_gpu_host(), "late", ["iommu-group:1"], old, tenant="t")
        assert late.outcome is CommitOutcome.CONFLICT
        assert guards.INCARNATION in late.detail

    arun(body())


def test_a_replica_reads_a_host_registered_again_under_the_same_id(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Its feed entries end at generation 0 as before: the incarnation tells the two apart."""

    async def body() -> None:
        a = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        b = PlacementCoordinator(RedisStateStore(redis_client), Host(), clock_ms=Clock())
        await a.register(three_gpu_host(), "agent:1")
        await b.refreshed()
        await a.forget(H, force=False, by="admin/ops")
        await a.register(three_gpu_host(boot_id="b2"), "agent:1")
        await b.refreshed()
        record = b.model.record(H)
        assert record is not None and record.boot_id == "b2"

    arun(body())


def test_a_landed_assumption_goes_once_the_store_has_moved_past_it_without_it(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """Another replica moved the host too, then the placement was released before a re-read."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        a = PlacementCoordinator(store, Host(), clock_ms=Clock())
        host = three_gpu_host()
        await a.register(host, "agent:1")
        await a.refreshed()
        mine = PlacementId(schema.placement_id("mine", H))
        a.model.assume(H, [SlotKey("iommu-group:2")], mine, TenantName("acme"))
        seen = await versions_now(store)
        other = await commit_on(store, host, "other", ["iommu-group:1"], seen, tenant="acme")
        assert other.alloc_generation == 1
        landed = await commit_on(store, host, "mine", ["iommu-group:2"], seen, tenant="acme")
        a.model.settle(H, mine, landed.alloc_generation)  # not the model's next: kept
        assert mine in a.model.live().hosts[HostId(H)].allocations.values()
        assert await store.release(H, mine)
        await a.refreshed()
        live = dict(a.model.live().hosts[HostId(H)].allocations)
        assert live == dict((await store.get_host(H)).allocations)  # type: ignore[union-attr]
        assert mine not in live.values()

    arun(body())


def test_a_commit_sent_again_after_its_reply_was_lost_answers_as_it_did_and_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """A client whose connection dropped after the server ran the commit sends it again."""

    async def body() -> None:
        store = RedisStateStore(redis_client)
        seen = await registered(store)
        first = await plan_and_commit(store, "r1", ["iommu-group:1"], seen, tenant="acme")
        again = await plan_and_commit(store, "r1", ["iommu-group:1"], seen, tenant="acme")
        assert first.outcome is CommitOutcome.COMMITTED
        assert again.outcome is CommitOutcome.COMMITTED
        assert again.placement_id == first.placement_id
        record = await store.get_host(H)
        assert record is not None
        assert set(record.allocations.values()) == {first.placement_id}

    arun(body())
