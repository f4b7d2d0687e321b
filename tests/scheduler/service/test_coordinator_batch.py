"""PlaceBatch and tenant-aware placing through the coordinator, on a real Valkey."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.agent_gateway import AgentCallError
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import NoCapacityError
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner


class Agents:
    """An AgentGateway that fails Prepare for chosen request ids."""

    def __init__(self) -> None:
        self.fail_for: set[str] = set()
        self.prepared: set[str] = set()

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        if placement.request_id in self.fail_for:
            raise AgentCallError(address, grpc.StatusCode.INTERNAL, "bind failed")
        self.prepared.add(placement.placement_id)
        return placement

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        self.prepared.discard(placement.placement_id)


def two_gpu_host(host_id: str) -> inventory_pb2.HostInventory:
    """Two GPUs, each alone in its IOMMU group, on NUMA node 0."""
    functions = [
        inventory_pb2.PciFunction(
            address=f"0000:0{i}:00.0", vendor_id=0x10DE, class_code=0x030200,
            iommu_group=i, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
        )
        for i in (1, 2)
    ]  # fmt: skip
    return inventory_pb2.HostInventory(
        host_id=host_id,
        boot_id="b1",
        generation=1,
        iommu_present=True,
        pci_functions=functions,
        iommu_groups=[
            inventory_pb2.IommuGroup(number=i, members=[f"0000:0{i}:00.0"]) for i in (1, 2)
        ],
    )


def gpus(
    request_id: str, tenant: str = "acme", count: int = 1, **kw: object
) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant=tenant,
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=count)],
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def setup(redis_client: aioredis.Redis) -> tuple[PlacementCoordinator, Agents]:
    agents = Agents()
    return PlacementCoordinator(RedisStateStore(redis_client), agents), agents


def test_a_gang_whose_member_fails_to_prepare_is_released_whole(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, agents = setup

    async def body() -> None:
        await coordinator.register(two_gpu_host("h1"), "agent:1")
        await coordinator.register(two_gpu_host("h2"), "agent:2")
        agents.fail_for = {"g2"}
        placed, unplaced = await coordinator.place_batch(
            [gpus("g1", gang="train"), gpus("g2", gang="train"), gpus("solo")], False
        )
        # The gang's placed member was released; the request outside it stays.
        assert [p.request_id for p in placed] == ["solo"]
        assert {u.request_id for u in unplaced} == {"g1", "g2"}
        assert any("gang 'train'" in r for u in unplaced for r in u.reasons)
        assert [p.request_id for p in await coordinator.list_placements()] == ["solo"]
        assert len(agents.prepared) == 1

    arun(body())


def test_an_all_or_nothing_batch_that_cannot_fit_places_nothing(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await coordinator.register(two_gpu_host("h1"), "agent:1")
        placed, unplaced = await coordinator.place_batch([gpus("a"), gpus("b", count=2)], True)
        assert placed == []
        assert {u.request_id for u in unplaced} == {"a", "b"}
        assert await coordinator.list_placements() == []

    arun(body())


def test_a_host_exclusive_tenant_keeps_other_tenants_off_its_host(
    setup: tuple[PlacementCoordinator, Agents], arun: Runner
) -> None:
    coordinator, _ = setup

    async def body() -> None:
        await coordinator.register(two_gpu_host("h1"), "agent:1")
        first = await coordinator.place(
            gpus("x1", tenant="secretive", exclusivity=placement_pb2.EXCLUSIVITY_DOMAIN_HOST)
        )
        assert first.host_id == "h1"
        # The tenant is read back from the store: another tenant is refused...
        with pytest.raises(NoCapacityError) as refused:
            await coordinator.place(gpus("y1", tenant="other"))
        assert any("domain-held-exclusively" in r for r in refused.value.reasons)
        # ... while the same tenant may add to its own host.
        again = await coordinator.place(gpus("x2", tenant="secretive"))
        assert again.host_id == "h1"

    arun(body())
