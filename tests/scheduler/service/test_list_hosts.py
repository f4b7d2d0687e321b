"""ListHosts tells the truth: what is in use in every form, MIG capacity, dead hosts.

Through the coordinator on a real Valkey, on the discovered inventory of the
``virt-2s`` fixture host (``tests/agent/golden/virt-2s.json``, as its agent
registers it) with its A100 switched to MIG mode::

    31:00.0, 31:00.1  ConnectX-6 Dx PFs (groups 2, 3), 8 VFs each, none enabled
    4b:00.0           A100 80GB PCIe (group 5), MIG on, no instance
    6b:00.0           QAT 4xxx (group 6), 16 VFs
    b1:00.0           Tesla P4 (group 8), vGPU mdev parent
    cb:00.0, cb:00.1  E810 PFs (groups 10, 11), 64 VFs each
    06:0d.0, 06:0d.1  e1000 NICs behind a PCI bridge (group 0)

The agents are a fake at the gRPC edge (test_host_admin's); the rest is the
production path, the housekeeper included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format

from tessera.scheduler.cli.tables import format_hosts
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2

from ...conftest import Runner
from .test_host_admin import Agents

GOLDEN = Path(__file__).resolve().parents[2] / "agent" / "golden" / "virt-2s.json"
HOST = "virt-2s"
A100 = "0000:4b:00.0"
A100_DEVICE_ID = 0x20B5
P4 = "0000:b1:00.0"
NOW_MS = 10_000_000
HOUR_MS = 3_600_000
#: The forms ListHosts counts, every one present.
NOTHING_USED = {"whole": 0, "vf": 0, "mdev": 0, "mig": 0}


def virt_2s(*, mig: bool = True) -> inventory_pb2.HostInventory:
    """The fixture host's inventory as its agent registers it, the A100 in MIG mode."""
    data = json.loads(GOLDEN.read_text())
    data["bootId"], data["generation"] = "boot-1", "1"
    inv = json_format.ParseDict(data, inventory_pb2.HostInventory())
    assert inv.host_id == HOST
    for gpu in inv.gpus:
        if gpu.address == A100 and mig:
            gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
            gpu.mig_mode_pending = inventory_pb2.MIG_MODE_ENABLED
    return inv


class Clock:
    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def coordinator(redis_client: aioredis.Redis, clock: Clock) -> PlacementCoordinator:
    return PlacementCoordinator(RedisStateStore(redis_client), Agents(), clock_ms=clock)


def claim(
    kind: placement_pb2.DeviceKind.ValueType,
    form: placement_pb2.DeviceForm.ValueType,
    **fields: object,
) -> placement_pb2.Claim:
    return placement_pb2.Claim(
        name="c", kind=kind, count=1, forms=[form],
        min_isolation=placement_pb2.ISOLATION_SHARED, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def request(
    request_id: str, tenant: str, one: placement_pb2.Claim
) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(request_id=request_id, tenant=tenant, claims=[one])


WHOLE_A100 = claim(
    placement_pb2.DEVICE_KIND_GPU,
    placement_pb2.DEVICE_FORM_WHOLE_DEVICE,
    selector=placement_pb2.DeviceSelector(device_ids=[A100_DEVICE_ID]),
)
A_VF = claim(
    placement_pb2.DEVICE_KIND_NIC,
    placement_pb2.DEVICE_FORM_VF,
    selector=placement_pb2.DeviceSelector(vendor_id=0x15B3),
)
A_VGPU = claim(
    placement_pb2.DEVICE_KIND_GPU, placement_pb2.DEVICE_FORM_MDEV, mdev_types=["nvidia-63"]
)
A_MIG_SLICE = claim(
    placement_pb2.DEVICE_KIND_GPU, placement_pb2.DEVICE_FORM_MIG, mig_profiles=["1g.10gb"]
)


async def listed(coordinator: PlacementCoordinator) -> scheduler_pb2.HostSummary:
    [summary] = await coordinator.hosts()
    return summary


def test_a_mig_gpu_handed_over_whole_offers_no_mig_instance(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        assert await coordinator.register(virt_2s(), "virt-2s:50052")
        [free] = (await listed(coordinator)).mig
        assert free.gpu_address == A100 and free.free["7g.80gb"] == 1  # the premise

        placed = await coordinator.place(request("r1", "acme", WHOLE_A100))
        assert [a.whole_device.address for a in placed.allocations] == [A100]
        summary = await listed(coordinator)
        # Still listed (MIG is on), but nothing free: the GPU is passed through.
        assert [(m.gpu_address, dict(m.free), m.fragmentation) for m in summary.mig] == [
            (A100, {}, 0.0)
        ]
        assert summary.used_by_form == {**NOTHING_USED, "whole": 1}

        await coordinator.release(placed.placement_id, "")
        [free] = (await listed(coordinator)).mig
        assert free.free["7g.80gb"] == 1

    arun(body())


def test_groups_used_counts_vfs_mdevs_and_mig_instances_not_only_whole_groups(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        assert await coordinator.register(virt_2s(), "virt-2s:50052")
        before = await listed(coordinator)
        assert before.allocated_groups == 0 and before.used_by_form == NOTHING_USED

        vf = await coordinator.place(request("r-vf", "acme", A_VF))
        vgpu = await coordinator.place(request("r-vgpu", "blue", A_VGPU))
        mig = await coordinator.place(request("r-mig", "acme", A_MIG_SLICE))
        assert [a.mdev.parent_address for a in vgpu.allocations] == [P4]
        assert [a.mig.gpu_address for a in mig.allocations] == [A100]
        summary = await listed(coordinator)
        # A PF with a VF handed out, an mdev parent with a vGPU, a MIG GPU
        # with an instance: three groups in use, none held whole.
        assert (summary.allocated_groups, summary.assignable_groups) == (
            3,
            before.assignable_groups,
        )
        assert summary.used_by_form == {"whole": 0, "vf": 1, "mdev": 1, "mig": 1}
        [a100] = summary.mig
        assert a100.free["7g.80gb"] == 0 and a100.free["1g.10gb"] == 6

        for placement in (vf, vgpu, mig):
            await coordinator.release(placement.placement_id, "")
        after = await listed(coordinator)
        assert after.allocated_groups == 0 and after.used_by_form == NOTHING_USED

    arun(body())


def test_a_dead_host_says_its_lease_expired_and_goes_a_day_later_if_it_holds_nothing(
    redis_client: aioredis.Redis, coordinator: PlacementCoordinator, clock: Clock, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_client)
        keeper = Housekeeper(store, Agents(), HousekeepingSettings(lease_s=20), clock_ms=clock)
        assert await coordinator.register(virt_2s(), "virt-2s:50052")
        summary = await listed(coordinator)
        assert summary.schedulable and not summary.lease_expired

        clock.ms += 3 * HOUR_MS  # the agent went silent
        assert (await keeper.round()).leases_expired == 1
        summary = await listed(coordinator)
        assert summary.lease_expired and not summary.schedulable and not summary.cordoned
        assert summary.heartbeat_age_ms == 3 * HOUR_MS
        assert "NO (lease expired, no heartbeat for 3h)" in format_hosts([summary])

        clock.ms += 24 * HOUR_MS  # dead longer than forget_dead_after_s (a day)
        assert (await keeper.round()).dead_hosts_forgotten == 1
        assert await coordinator.hosts() == []

    arun(body())


def test_tessera_hosts_shows_use_by_form_and_why_a_host_is_not_schedulable(
    redis_client: aioredis.Redis, coordinator: PlacementCoordinator, clock: Clock, arun: Runner
) -> None:
    async def body() -> str:
        store = RedisStateStore(redis_client)
        keeper = Housekeeper(store, Agents(), HousekeepingSettings(lease_s=20), clock_ms=clock)
        assert await coordinator.register(virt_2s(), "virt-2s:50052")
        await coordinator.place(request("r-whole", "acme", WHOLE_A100))
        for i in range(3):
            await coordinator.place(request(f"r-vf{i}", "acme", A_VF))
        await coordinator.cordon(HOST, "RMA 42", "admin/ops")
        clock.ms += 2 * 86_400_000
        await keeper.round()
        return format_hosts(await coordinator.hosts(), wide=True)

    table = arun(body())
    header, row = table.splitlines()
    assert "USED" in header.split()
    assert "whole 1, vf 3" in row
    # Cordoned and dead: both said. Holding placements, it is not forgotten.
    assert "NO (cordoned; lease expired, no heartbeat for 2d)" in row
    assert f"{A100}: none (taken whole, by VFs or mdevs, or unusable)" in row
