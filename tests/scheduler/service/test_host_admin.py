"""Cordon, drain and forget through the coordinator, on a real Valkey.

The agents are a fake at the gRPC edge (what each host holds, a Prepare that
can be held open, a teardown that can be made to fail); everything else is
the production path.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from tessera.scheduler.core.validation import InvalidRequestError
from tessera.scheduler.service.agent_gateway import AgentCallError
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import HostBusyError, HostNotFoundError, NoCapacityError
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner

STATE = placement_pb2.PlacementState


class Agents:
    """Every host's agent as the scheduler reaches it.

    Attributes:
        held: placement ids each agent address holds prepared.
        hold_prepare: Prepare waits for ``release_prepare`` while set.
        fail_unprepare: placement ids whose teardown fails.
    """

    def __init__(self) -> None:
        self.held: dict[str, set[str]] = {}
        self.hold_prepare = False
        self.release_prepare = asyncio.Event()
        self.preparing = asyncio.Event()
        self.fail_unprepare: set[str] = set()

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        if self.hold_prepare:
            self.preparing.set()
            await self.release_prepare.wait()
        self.held.setdefault(address, set()).add(placement.placement_id)
        return placement

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        if placement.placement_id in self.fail_unprepare:
            raise AgentCallError(address, grpc.StatusCode.INTERNAL, "device reset failed")
        self.held.get(address, set()).discard(placement.placement_id)

    # What the housekeeper needs (fenced calls; the fake keeps no fence).

    async def get_state(self, address: str, host_id: str) -> list[str]:
        return sorted(self.held.get(address, set()))

    async def prepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> placement_pb2.Placement:
        return await self.prepare(address, placement)

    async def unprepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> None:
        await self.unprepare(address, placement)


def inventory(host_id: str, boot_id: str = "b1") -> inventory_pb2.HostInventory:
    """A host with two GPUs, each alone in its IOMMU group."""
    return inventory_pb2.HostInventory(
        host_id=host_id, boot_id=boot_id, generation=1, iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address=f"0000:0{i}:00.0", vendor_id=0x10DE, class_code=0x030200,
                iommu_group=i, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
            )
            for i in (1, 2)
        ],
        iommu_groups=[
            inventory_pb2.IommuGroup(number=i, members=[f"0000:0{i}:00.0"]) for i in (1, 2)
        ],
    )  # fmt: skip


def gpu(request_id: str, host: str = "") -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
        host_selector={"name": host} if host else {},
    )


@pytest.fixture
def setup(redis_client: aioredis.Redis) -> tuple[PlacementCoordinator, Agents]:
    agents = Agents()
    return PlacementCoordinator(RedisStateStore(redis_client), agents), agents


async def register(coordinator: PlacementCoordinator, host_id: str, boot_id: str = "b1") -> None:
    report = inventory(host_id, boot_id)
    report.labels["name"] = host_id
    assert await coordinator.register(report, f"{host_id}:50052")


def test_a_cordoned_host_gets_no_new_placement_and_keeps_its_own(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await register(coordinator, "h1")
        await register(coordinator, "h2")
        kept = await coordinator.place(gpu("kept", host="h1"))
        summary = await coordinator.cordon("h1", "bad inventory", "admin/ops")
        assert summary.cordoned and not summary.schedulable
        assert (summary.cordon_reason, summary.cordoned_by) == ("bad inventory", "admin/ops")
        for i in range(2):
            assert (await coordinator.place(gpu(f"r{i}"))).host_id == "h2"
        with pytest.raises(NoCapacityError, match="host/"):
            await coordinator.place(gpu("r-full"))
        # The cordoned host's own placement stays, and can be released.
        assert (await coordinator.get(kept.placement_id, "")).state == STATE.PLACEMENT_STATE_READY
        await coordinator.release(kept.placement_id, "")
        with pytest.raises(NoCapacityError):
            await coordinator.place(gpu("r-full"))
        assert not (await coordinator.uncordon("h1", "admin/ops")).cordoned
        assert (await coordinator.place(gpu("r-full"))).host_id == "h1"

    arun(body())


def test_list_hosts_reports_the_cordon_through_re_registration_and_heartbeats(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await register(coordinator, "h1")
        await register(coordinator, "h2")
        await coordinator.cordon("h1", "firmware update", "admin/ops")
        await register(coordinator, "h1")  # the agent restarted
        assert await coordinator.heartbeat("h1", "b1", None)
        changed = inventory("h1")
        changed.generation = 2
        assert await coordinator.heartbeat("h1", "b1", changed)
        await register(coordinator, "h1", boot_id="b2")  # and the host rebooted
        hosts = {h.host_id: h for h in await coordinator.hosts()}
        assert hosts["h1"].cordoned and not hosts["h1"].schedulable
        assert hosts["h1"].cordon_reason == "firmware update"
        assert not hosts["h2"].cordoned and hosts["h2"].schedulable
        assert hosts["h2"].cordon_reason == ""

    arun(body())


def test_a_drain_releases_what_it_can_and_says_why_not_for_the_rest(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await register(coordinator, "h1")
        ready = await coordinator.place(gpu("ready"))
        agents.hold_prepare = True
        pending = asyncio.create_task(coordinator.place(gpu("pending")))
        await agents.preparing.wait()
        in_flight = await coordinator.get("", "pending", "acme")

        summary, released, failed = await coordinator.drain("h1", "", "admin/ops")
        assert summary.cordoned and summary.cordon_reason == "drained"
        assert [p.placement_id for p in released] == [ready.placement_id]
        assert [f.placement_id for f in failed] == [in_flight.placement_id]
        assert "pending" in failed[0].reason
        assert agents.held["h1:50052"] == set()

        # The pending one becomes READY; its teardown then fails: it stays,
        # FAILED with its slots held, and the drain says so.
        agents.release_prepare.set()
        placed = await pending
        agents.fail_unprepare.add(placed.placement_id)
        _, released, failed = await coordinator.drain("h1", "", "admin/ops")
        assert released == [] and [f.placement_id for f in failed] == [placed.placement_id]
        assert "device reset failed" in failed[0].reason
        stuck = await coordinator.get(placed.placement_id, "")
        assert stuck.state == STATE.PLACEMENT_STATE_FAILED

        # Once the host can tear it down, draining again empties the host.
        agents.fail_unprepare.clear()
        summary, released, failed = await coordinator.drain("h1", "", "admin/ops")
        assert [p.placement_id for p in released] == [placed.placement_id] and failed == []
        assert summary.allocated_groups == 0 and summary.cordoned
        assert await coordinator.list_placements(host_id="h1") == []

    arun(body())


def test_a_drain_keeps_an_operators_cordon(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await register(coordinator, "h1")
        await coordinator.cordon("h1", "RMA ticket 42", "admin/alice")
        summary, _, _ = await coordinator.drain("h1", "other reason", "admin/bob")
        assert (summary.cordon_reason, summary.cordoned_by) == ("RMA ticket 42", "admin/alice")

    arun(body())


def test_forget_refuses_a_host_with_placements_until_it_is_drained(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await register(coordinator, "h1")
        placed = await coordinator.place(gpu("r1"))
        with pytest.raises(HostBusyError, match="drain it first") as refused:
            await coordinator.forget("h1", False, "admin/ops")
        assert placed.placement_id in str(refused.value) and "(ready)" in str(refused.value)
        assert [h.host_id for h in await coordinator.hosts()] == ["h1"]
        await coordinator.drain("h1", "", "admin/ops")
        assert await coordinator.forget("h1", False, "admin/ops") == []
        assert await coordinator.hosts() == []
        with pytest.raises(HostNotFoundError):
            await coordinator.forget("h1", False, "admin/ops")

    arun(body())


def test_a_forgotten_host_comes_back_as_new_when_its_agent_registers_again(
    setup: tuple[PlacementCoordinator, Agents], redis_client: aioredis.Redis, arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await register(coordinator, "h1")
        placed = await coordinator.place(gpu("r1"))
        await coordinator.cordon("h1", "bad inventory", "admin/ops")
        dropped = await coordinator.forget("h1", True, "admin/ops")
        assert dropped == [placed.placement_id]
        assert await redis_client.keys(f"{schema.PREFIX}\\{{h1\\}}*") == []
        # Not torn down: the host still holds it (its reconciler's business).
        assert agents.held["h1:50052"] == {placed.placement_id}
        # The agent's next heartbeat is refused, so it registers again.
        assert not await coordinator.heartbeat("h1", "b1", None)
        await register(coordinator, "h1")
        [host] = await coordinator.hosts()
        assert host.schedulable and not host.cordoned and host.allocated_groups == 0
        # The dropped placement's request id is free: it places afresh.
        again = await coordinator.place(gpu("r1"))
        assert again.placement_id != placed.placement_id

    arun(body())


def test_the_reconciler_tears_down_what_a_forced_forget_left_on_the_host(
    setup: tuple[PlacementCoordinator, Agents], redis_client: aioredis.Redis, arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        store = RedisStateStore(redis_client)
        keeper = Housekeeper(store, agents, HousekeepingSettings(full_sweep_s=0), owner="a")
        await register(coordinator, "h1")
        placed = await coordinator.place(gpu("r1"))
        assert (await keeper.round()).hosts_reconciled == 1
        assert await coordinator.forget("h1", True, "admin/ops") == [placed.placement_id]
        await register(coordinator, "h1")
        report = await keeper.round()
        assert report.orphans_torn_down == 1, report
        assert agents.held["h1:50052"] == set()

    arun(body())


def test_unknown_and_malformed_host_ids_are_refused(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        for call in (
            coordinator.cordon("nowhere", "", "admin/ops"),
            coordinator.uncordon("nowhere", "admin/ops"),
            coordinator.drain("nowhere", "", "admin/ops"),
            coordinator.forget("nowhere", True, "admin/ops"),
        ):
            with pytest.raises(HostNotFoundError, match="nowhere"):
                await call
        with pytest.raises(InvalidRequestError, match="host_id"):
            await coordinator.cordon("{h1}", "", "admin/ops")
        with pytest.raises(InvalidRequestError, match="reason"):
            await coordinator.cordon("h1", "x" * 10_000, "admin/ops")

    arun(body())
