"""The coordinator's two-phase path against a real Valkey, with a scripted agent.

The agent edge is replaced by a gateway whose Prepare waits until the test lets
it go, so that races between Place and Release can be staged exactly.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.agent_gateway import AgentCallError
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import HostOperationError, PlacementBusyError
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner


class ScriptedAgents:
    """An AgentGateway that holds Prepare until released and can be told to fail."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.fail_prepare = False
        self.prepared: set[str] = set()
        # Where the agent listens (None: wherever it is called); every
        # Unprepare's address, in order.
        self.listening: str | None = None
        self.unprepared_at: list[str] = []
        # State changes a hostile agent writes into the placement it returns.
        self.forged_history: list[placement_pb2.StateChange] = []

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        self.entered.set()
        await self.gate.wait()
        if self.fail_prepare:
            raise AgentCallError(address, grpc.StatusCode.INTERNAL, "bind failed")
        self.prepared.add(placement.placement_id)
        if self.forged_history:
            forged = placement_pb2.Placement()
            forged.CopyFrom(placement)
            forged.history.extend(self.forged_history)
            return forged
        return placement

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        self.unprepared_at.append(address)
        if self.listening is not None and address != self.listening:
            raise AgentCallError(address, grpc.StatusCode.UNAVAILABLE, "connection refused")
        self.prepared.discard(placement.placement_id)


def inventory() -> inventory_pb2.HostInventory:
    return inventory_pb2.HostInventory(
        host_id="h1",
        boot_id="b1",
        generation=1,
        iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address="0000:01:00.0", vendor_id=0x10DE, class_code=0x030200,
                iommu_group=3, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
            )
        ],
        iommu_groups=[inventory_pb2.IommuGroup(number=3, members=["0000:01:00.0"])],
    )  # fmt: skip


def gpu(request_id: str) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    )


@pytest.fixture
def setup(redis_client: aioredis.Redis) -> tuple[PlacementCoordinator, ScriptedAgents]:
    agents = ScriptedAgents()
    return PlacementCoordinator(RedisStateStore(redis_client), agents), agents


def test_a_release_while_prepare_is_in_flight_is_refused_and_frees_nothing(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        place = asyncio.create_task(coordinator.place(gpu("r1")))
        await agents.entered.wait()
        pending = await coordinator.get("", "r1", "acme")
        with pytest.raises(PlacementBusyError):
            await coordinator.release(pending.placement_id, "")
        with pytest.raises(PlacementBusyError):  # a retry of r1 meanwhile
            await coordinator.place(gpu("r1"))
        agents.gate.set()
        ready = await place
        assert ready.state == placement_pb2.PLACEMENT_STATE_READY
        # The group is still held: a second tenant cannot get it.
        with pytest.raises(Exception, match="iommu-group-allocated"):
            await coordinator.place(gpu("r2"))
        await coordinator.release(ready.placement_id, "")
        assert agents.prepared == set()

    arun(body())


def test_a_placements_history_is_the_schedulers_own_whatever_its_agent_returns(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup
    agents.gate.set()
    # An agent answering Prepare with states the placement never went through.
    agents.forged_history = [
        placement_pb2.StateChange(
            state=placement_pb2.PLACEMENT_STATE_FAILED, unix_ms=1, message="forged"
        )
    ] * 1000

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        stored = await coordinator.get(placed.placement_id, "")
        for placement in (placed, stored):
            assert [h.state for h in placement.history] == [
                placement_pb2.PLACEMENT_STATE_PENDING,
                placement_pb2.PLACEMENT_STATE_READY,
            ]
            assert all(h.message != "forged" for h in placement.history)

    arun(body())


def test_a_failed_prepare_releases_the_reservation(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        agents.fail_prepare = True
        agents.gate.set()
        with pytest.raises(HostOperationError, match="bind failed"):
            await coordinator.place(gpu("r1"))
        assert await coordinator.list_placements() == []
        agents.fail_prepare = False
        placed = await coordinator.place(gpu("r1"))
        assert placed.state == placement_pb2.PLACEMENT_STATE_READY

    arun(body())


def test_a_cancelled_place_does_not_leave_its_reservation_behind(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        place = asyncio.create_task(coordinator.place(gpu("r1")))
        await agents.entered.wait()
        place.cancel()
        with pytest.raises(asyncio.CancelledError):
            await place
        assert await coordinator.list_placements() == []
        agents.gate.set()
        assert (await coordinator.place(gpu("r2"))).state == placement_pb2.PLACEMENT_STATE_READY

    arun(body())


def test_a_reboot_fails_the_hosts_placements_and_keeps_their_slots_until_released(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        agents.gate.set()
        placed = await coordinator.place(gpu("r1"))
        rebooted = inventory()
        rebooted.boot_id = "b2"
        assert await coordinator.register(rebooted, "agent:1")
        failed = await coordinator.get(placed.placement_id, "")
        assert failed.state == placement_pb2.PLACEMENT_STATE_FAILED
        assert "rebooted" in failed.message
        with pytest.raises(Exception, match="iommu-group-allocated"):
            await coordinator.place(gpu("r2"))
        await coordinator.release(placed.placement_id, "")
        assert (await coordinator.place(gpu("r2"))).state == placement_pb2.PLACEMENT_STATE_READY

    arun(body())


def test_a_release_finds_an_agent_that_moved_since_the_replica_last_looked(
    setup: tuple[PlacementCoordinator, ScriptedAgents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(inventory(), "agent:1")
        agents.gate.set()
        placed = await coordinator.place(gpu("r1"))
        # The agent restarts on another port; no Place since, so the
        # replica's model still has the old address.
        await coordinator.register(inventory(), "agent:2")
        agents.listening = "agent:2"
        released = await coordinator.release(placed.placement_id, "")
        assert released.message == "released"
        assert agents.unprepared_at == ["agent:1", "agent:2"]
        assert agents.prepared == set()
        assert await coordinator.list_placements() == []

    arun(body())
