"""One replica's commits on one device go in the order planned, each expecting the last.

A replica plans many requests while earlier commits are still in flight; its
live model assumes those commits, versions included, so the next plan for
the same device expects the versions they leave. The plan applier then sends
that commit only after the ones it expects have answered, and expects less of
those that did not land. Without this, every second request for a busy
device lost its commit race to its own replica (issue 12, item 4). The store
and the engine are real; only the agents' side is a stub.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.core import guards
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId
from tessera.scheduler.core.lifecycle import PENDING, READY, move
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.service.convert import Submitted, submitted
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.placement_moves import PlacementMoves
from tessera.scheduler.service.plan_applier import PlanApplier
from tessera.scheduler.service.request_claims import RequestClaims, new_claimant
from tessera.scheduler.store.redis_store import CommitOutcome, CommitResult, RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner
from .test_housekeeping import Clock, Host
from .test_inventory_check import golden

H = "nic-host"


def nic_host() -> inventory_pb2.HostInventory:
    """The sriov-nic fixture host (SR-IOV NICs with VFs), named ``nic-host``."""
    inventory = golden("sriov-nic")
    inventory.host_id = H
    return inventory


def vfs(request_id: str) -> placement_pb2.PlacementRequest:
    """Two VFs of NICs for tenant acme."""
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[
            placement_pb2.Claim(
                name="vf",
                kind=placement_pb2.DEVICE_KIND_NIC,
                count=2,
                forms=[placement_pb2.DEVICE_FORM_VF],
                min_isolation=placement_pb2.ISOLATION_SHARED,
            )
        ],
    )


@pytest.fixture
def store(redis_client: aioredis.Redis) -> RedisStateStore:
    return RedisStateStore(redis_client)


def test_concurrent_requests_for_one_device_commit_without_losing_a_race_to_each_other(
    store: RedisStateStore, arun: Runner
) -> None:
    async def body() -> None:
        coordinator = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await coordinator.register(nic_host(), "agent:1")
        placed = await asyncio.gather(*(coordinator.place(vfs(f"r{i}")) for i in range(8)))
        assert all(p.state == placement_pb2.PLACEMENT_STATE_READY for p in placed)
        assert coordinator.commit_outcomes["CONFLICT"] == 0
        assert coordinator.commit_outcomes["COMMITTED"] == 8
        held = [(a.vf.pf_address, a.vf.vf_index) for p in placed for a in p.allocations]
        assert len(set(held)) == 16, "every VF went to one placement"
        # The chain was exercised: requests shared a PF.
        assert len({pf for pf, _ in held}) < len(held)

    arun(body())


class Parts:
    """The rooms one replica plans and commits with, over one store."""

    def __init__(self, store: RedisStateStore) -> None:
        clock = Clock()
        self.model = LiveCluster(store, clock)
        self.applier = PlanApplier(store, Host(), self.model, PlacementMoves(store, clock), clock)
        self.claims = RequestClaims(store)
        self.engine = Engine()

    async def claimed(self, request_id: str) -> tuple[Submitted, str]:
        sub = submitted(vfs(request_id))
        claimant = new_claimant()
        assert await self.claims.claim(sub, claimant) is None
        return sub, claimant

    def plan(self, sub: Submitted) -> Plan:
        plan = self.engine.schedule(self.model.live(), sub.request)
        assert isinstance(plan, Plan)
        return plan

    def state(self, plan: Plan) -> HostState:
        """The plan's host as planning sees it now."""
        return self.model.live().hosts[HostId(plan.host_id)]


def share_a_device(a: Plan, b: Plan, view: HostView) -> bool:
    """Whether two plans on one host take slots of one physical device."""
    return bool(set(guards.changed_by(view, a.slots)) & set(guards.changed_by(view, b.slots)))


async def registered_parts(store: RedisStateStore) -> Parts:
    await PlacementCoordinator(store, Host(), clock_ms=Clock()).register(nic_host(), "agent:1")
    parts = Parts(store)
    await parts.model.refresh()
    return parts


@dataclass
class PlannedBehind:
    """A second request planned while the first's commit, which cannot land, is in flight."""

    first_plan: Plan
    first_commit: asyncio.Task[tuple[CommitResult, placement_pb2.Placement]]
    second: Submitted
    second_claimant: str
    second_plan: Plan
    second_state: HostState


async def planned_behind_a_lost_commit(parts: Parts) -> PlannedBehind:
    """The first commit is sent under a claim the call does not hold (it cannot
    land); the second request is planned while it is in flight, on a state that
    assumes it."""
    first, _ = await parts.claimed("first")
    second, second_claimant = await parts.claimed("second")
    first_plan = parts.plan(first)
    first_commit = asyncio.create_task(
        parts.applier.commit(first, first_plan, "not-the-claimant", parts.state(first_plan))
    )
    await asyncio.sleep(0)
    second_plan = parts.plan(second)
    return PlannedBehind(
        first_plan, first_commit, second, second_claimant, second_plan, parts.state(second_plan)
    )


def test_a_commit_after_one_that_did_not_land_expects_the_versions_without_it(
    store: RedisStateStore, arun: Runner
) -> None:
    async def body() -> None:
        parts = await registered_parts(store)
        b = await planned_behind_a_lost_commit(parts)
        assert not set(b.first_plan.slots) & set(b.second_plan.slots)
        view = b.second_state.view
        assert share_a_device(b.first_plan, b.second_plan, view), "both plans take VFs of one PF"
        result, _ = await parts.applier.commit(
            b.second, b.second_plan, b.second_claimant, b.second_state
        )
        lost, _ = await b.first_commit
        assert lost.outcome is CommitOutcome.LOST
        assert result.outcome is CommitOutcome.COMMITTED, result.detail
        record = await store.get_host(H)
        assert record is not None
        assert set(record.allocations) == set(b.second_plan.slots)

    arun(body())


def test_a_commit_after_one_that_lost_to_a_change_it_did_not_see_does_not_land_either(
    store: RedisStateStore, arun: Runner
) -> None:
    async def body() -> None:
        parts = await registered_parts(store)
        # Another writer moves the host; this replica has not read it yet.
        await store.cordon_host(H, reason="maintenance", by="ops", now_ms=1)
        await store.uncordon_host(H)
        first, first_claimant = await parts.claimed("first")
        second, second_claimant = await parts.claimed("second")
        first_plan = parts.plan(first)
        first_state = parts.state(first_plan)
        first_commit = asyncio.create_task(
            parts.applier.commit(first, first_plan, first_claimant, first_state)
        )
        await asyncio.sleep(0)
        second_plan = parts.plan(second)
        second_state = parts.state(second_plan)
        result, _ = await parts.applier.commit(second, second_plan, second_claimant, second_state)
        conflicted, _ = await first_commit
        # Both plans were made on a state the store has left: neither lands,
        # though the second expects less once the first is known not to.
        assert conflicted.outcome is CommitOutcome.CONFLICT
        assert result.outcome is CommitOutcome.CONFLICT, result.detail
        record = await store.get_host(H)
        assert record is not None
        assert not record.allocations

    arun(body())


def test_a_commit_planned_while_a_release_frees_its_device_waits_for_it_and_lands(
    store: RedisStateStore, arun: Runner
) -> None:
    async def body() -> None:
        parts = await registered_parts(store)
        first, first_claimant = await parts.claimed("first")
        first_plan = parts.plan(first)
        state = parts.state(first_plan)
        committed, placement = await parts.applier.commit(first, first_plan, first_claimant, state)
        assert committed.outcome is CommitOutcome.COMMITTED
        record = parts.model.record(H)
        assert record is not None
        ready = await parts.applier.prepare(placement, record)
        # The release is under way: the model assumes what it will bump.
        releasing = asyncio.create_task(parts.applier.release(ready))
        for _ in range(100):
            if any(p.endswith("/release") for p in parts.model.live().hosts[HostId(H)].planned):
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the release was never assumed")
        second, second_claimant = await parts.claimed("second")
        second_plan = parts.plan(second)
        view = state.view
        assert share_a_device(first_plan, second_plan, view), (
            "the second plan takes VFs of the PF being freed"
        )
        result, _ = await parts.applier.commit(
            second,
            second_plan,
            second_claimant,
            parts.state(second_plan),
        )
        released = await releasing
        assert released.message == "released"
        assert result.outcome is CommitOutcome.COMMITTED, result.detail
        assert parts.applier.commit_outcomes["CONFLICT"] == 0

    arun(body())


def test_a_plan_that_assumed_a_commit_which_did_not_land_is_not_accepted_after_a_foreign_one(
    store: RedisStateStore, arun: Runner
) -> None:
    """The plan expects the versions the assumed commit would have left; it did not
    land, and another replica's commit moved the device by as much: the plan never
    saw that commit, so the store must refuse it (a batch plans, then awaits)."""

    async def body() -> None:
        parts = await registered_parts(store)
        other = Parts(store)  # a second replica
        await other.model.refresh()
        foreign, foreign_claimant = await other.claimed("foreign")
        b = await planned_behind_a_lost_commit(parts)
        lost, _ = await b.first_commit
        assert lost.outcome is CommitOutcome.LOST
        foreign_plan = other.plan(foreign)
        view = b.second_state.view
        assert share_a_device(foreign_plan, b.second_plan, view), (
            "the foreign commit moves the device the second plan takes"
        )
        landed, _ = await other.applier.commit(
            foreign,
            foreign_plan,
            foreign_claimant,
            other.state(foreign_plan),
        )
        assert landed.outcome is CommitOutcome.COMMITTED
        result, _ = await parts.applier.commit(
            b.second, b.second_plan, b.second_claimant, b.second_state
        )
        assert result.outcome is CommitOutcome.CONFLICT, result.detail

    arun(body())


def test_a_place_cancelled_while_its_claim_is_on_the_way_leaves_the_request_id_free(
    store: RedisStateStore, arun: Runner
) -> None:
    async def body() -> None:
        coordinator = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await coordinator.register(nic_host(), "agent:1")
        placing = asyncio.create_task(coordinator.place(vfs("r1")))
        await asyncio.sleep(0)  # the claim is queued for this turn's batch
        placing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await placing
        # A retry is placed at once, not told the request is busy until the
        # cancelled call's claim expires.
        again = await coordinator.place(vfs("r1"))
        assert again.state == placement_pb2.PLACEMENT_STATE_READY

    arun(body())


def test_a_lifecycle_move_sent_again_after_its_reply_was_lost_is_taken_as_made(
    store: RedisStateStore, arun: Runner
) -> None:
    """PENDING -> READY ran, the reply was lost, the client's retry ran it again.

    The second run finds the placement READY already. Taken for a refusal,
    the applier would tear the devices down while the store says READY.
    Another caller's move to the same state is still a refusal.
    """

    async def body() -> None:
        parts = await registered_parts(store)
        sub, claimant = await parts.claimed("first")
        plan = parts.plan(sub)
        committed, placement = await parts.applier.commit(sub, plan, claimant, parts.state(plan))
        assert committed.outcome is CommitOutcome.COMMITTED
        moves = PlacementMoves(store, Clock())
        confirm = move(PENDING, to=READY)
        assert (await moves.apply(placement, confirm, "ready"))[0]
        # The same move again, as a retry sends it: the same payload.
        assert (await moves.apply(placement, confirm, "ready"))[0]
        # Not the same write: another message.
        assert not (await moves.apply(placement, confirm, "ready, said another"))[0]

    arun(body())
