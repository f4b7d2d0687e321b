"""SR-IOV vGPU: a GPU's VFs are themselves mdev parents (NVIDIA Ampere and later).

One VF function is one device: it goes either to a VF claim (``vf:<PF>#<i>``)
or hosts mdevs (``mdev:<VF>#<type>#<uuid>``), never both. The host is built
from the agent's report, as the coordinator builds it:

    PF  0000:41:00.0 (group 10), SR-IOV, 2 VFs enabled
    VF0 0000:41:00.4 (group 11), mdev parent: nvidia-700, one instance
    VF1 0000:41:00.5 (group 12), mdev parent: nvidia-700, one instance
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from tessera.scheduler.core.checker import RULE_INTERFERENCE, RULE_IOMMU_ISOLATION, check_placements
from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    RequestId,
    TenantName,
    iommu_group_slot,
    vfio_group_path,
)
from tessera.scheduler.core.plan import (
    MdevAssignment,
    Plan,
    Unschedulable,
    VfAssignment,
    WholeDeviceAssignment,
)
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.slots import mdev_slot, vf_slot
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.v1 import inventory_pb2

PF = PciAddress("0000:41:00.0")
VF0 = PciAddress("0000:41:00.4")
VF1 = PciAddress("0000:41:00.5")
#: A display-less GPU function beside VF0 in its IOMMU group (no ACS below).
NEIGHBOUR = PciAddress("0000:42:00.0")
VGPU = "nvidia-700"
LIVE_UUID = "0b1e2c3d-0000-4000-8000-00000000aaaa"

MakeRequest = Callable[[str, str], PlacementRequest]


def _fn(address: str, group: int, physfn: str = "") -> inventory_pb2.PciFunction:
    return inventory_pb2.PciFunction(
        address=address, vendor_id=0x10DE, device_id=0x2330, class_code=0x030200,
        iommu_group=group, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
        numa_node=0, physfn=physfn,
    )  # fmt: skip


def vgpu_host(
    *, live_mdev_on: PciAddress | None = None, neighbour_of_vf0: bool = False
) -> HostState:
    """The host above, optionally with a live mdev someone created on a VF.

    With ``neighbour_of_vf0`` another GPU shares VF0's IOMMU group.
    """
    functions = [_fn(PF, 10), _fn(VF0, 11, physfn=PF), _fn(VF1, 12, physfn=PF)]
    groups = {10: [PF], 11: [VF0], 12: [VF1]}
    if neighbour_of_vf0:
        functions.append(_fn(NEIGHBOUR, 11))
        groups[11].append(NEIGHBOUR)
    inv = inventory_pb2.HostInventory(
        host_id="h1", boot_id="b1", generation=1, iommu_present=True,
        pci_functions=functions,
        iommu_groups=[inventory_pb2.IommuGroup(number=g, members=m) for g, m in groups.items()],
        numa_nodes=[inventory_pb2.NumaNode(id=0, distances=[10])],
    )  # fmt: skip
    inv.sriov_pfs.append(
        inventory_pb2.SriovPf(
            address=PF, total_vfs=2, num_vfs=2, vf_device_id=0x2330,
            vfs=[
                inventory_pb2.VirtualFunction(index=0, address=VF0, iommu_group=11,
                                              has_iommu_group=True, driver="nvidia"),
                inventory_pb2.VirtualFunction(index=1, address=VF1, iommu_group=12,
                                              has_iommu_group=True, driver="nvidia"),
            ],
        )
    )  # fmt: skip
    for vf in (VF0, VF1):
        live = vf == live_mdev_on
        inv.mdev_parents.append(
            inventory_pb2.MdevParent(
                address=vf,
                types=[
                    inventory_pb2.MdevType(
                        id=VGPU, name="H100-80C", description="max_instance=1",
                        available_instances=0 if live else 1,
                        instances=[LIVE_UUID] if live else [],
                    )
                ],
                instances=[inventory_pb2.MdevInstance(uuid=LIVE_UUID, type_id=VGPU)]
                if live
                else [],
            )
        )  # fmt: skip
    view = host_view_from_inventory(inv)
    return HostState(view, 1)


def snapshot_of(state: HostState) -> ClusterSnapshot:
    return ClusterSnapshot(hosts={state.view.host_id: state})


def vf_request(rid: str, tenant: str) -> PlacementRequest:
    return PlacementRequest(
        RequestId(rid), TenantName(tenant),
        (Claim("g", DeviceKind.GPU, 1, frozenset({DeviceForm.VF}),
               min_isolation=Isolation.SHARED),),
    )  # fmt: skip


def mdev_request(rid: str, tenant: str) -> PlacementRequest:
    return PlacementRequest(
        RequestId(rid), TenantName(tenant),
        (Claim("g", DeviceKind.GPU, 1, frozenset({DeviceForm.MDEV}),
               mdev_types=frozenset({VGPU}), min_isolation=Isolation.SHARED),),
    )  # fmt: skip


def whole_request(rid: str, tenant: str) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName(tenant), (Claim("g", DeviceKind.GPU, 1),))


def place_in_turn(
    snapshot: ClusterSnapshot, requests: Sequence[PlacementRequest]
) -> list[tuple[PlacementRequest, Plan | Unschedulable]]:
    """Each request on the state the previous commits left, as the coordinator does."""
    engine = Engine()
    out: list[tuple[PlacementRequest, Plan | Unschedulable]] = []
    for request in requests:
        result = engine.schedule(snapshot, request)
        out.append((request, result))
        if isinstance(result, Plan):
            snapshot = with_reservation(
                snapshot, result.host_id, result.slots,
                PlacementId(f"pl-{request.request_id}"), request.tenant,
            )  # fmt: skip
    return out


def vf_functions_used(
    results: Sequence[tuple[PlacementRequest, Plan | Unschedulable]],
) -> list[PciAddress]:
    """Per placed unit, the VF function it uses (a VF's own, an mdev's parent)."""
    used: list[PciAddress] = []
    for _, result in results:
        if not isinstance(result, Plan):
            continue
        for a in result.assignments:
            if isinstance(a, VfAssignment):
                assert a.vf_address is not None  # the PF's VFs exist
                used.append(a.vf_address)
            elif isinstance(a, MdevAssignment):
                used.append(a.parent_address)
    return used


def placed(
    results: Sequence[tuple[PlacementRequest, Plan | Unschedulable]],
) -> list[tuple[PlacementRequest, Plan]]:
    return [(r, p) for r, p in results if isinstance(p, Plan)]


# --- (1) requests one after the other ------------------------------------------


@pytest.mark.parametrize(
    "first, second",
    [(vf_request, mdev_request), (mdev_request, vf_request)],
    ids=["vf-then-mdev", "mdev-then-vf"],
)
def test_a_vf_claim_and_an_mdev_claim_in_turn_never_share_a_vf_function(
    first: MakeRequest, second: MakeRequest
) -> None:
    start = snapshot_of(vgpu_host())
    results = place_in_turn(start, [first("r1", "x"), second("r2", "y")])
    # Both fit (two VFs), each on a VF function of its own.
    assert all(isinstance(p, Plan) for _, p in results), results
    used = vf_functions_used(results)
    assert sorted(used) == [VF0, VF1]
    assert check_placements(start, placed(results)) == []


@pytest.mark.parametrize(
    "requests",
    [
        ["vf", "vf", "mdev"],
        ["mdev", "mdev", "vf"],
        ["vf", "mdev", "vf", "mdev"],
        ["mdev", "vf", "mdev", "vf"],
    ],
)
def test_when_the_vf_functions_run_out_the_next_claim_of_either_form_is_refused(
    requests: list[str],
) -> None:
    start = snapshot_of(vgpu_host())
    make = {"vf": vf_request, "mdev": mdev_request}
    results = place_in_turn(
        start, [make[form](f"r{i}", f"t{i}") for i, form in enumerate(requests)]
    )
    assert [isinstance(p, Plan) for _, p in results] == [True, True] + [False] * (len(requests) - 2)
    assert sorted(vf_functions_used(results)) == [VF0, VF1]
    assert check_placements(start, placed(results)) == []


def test_a_vf_whose_function_runs_a_live_mdev_is_not_free() -> None:
    # Someone created an mdev on VF0 outside Tessera: the VF claim gets VF1.
    start = snapshot_of(vgpu_host(live_mdev_on=VF0))
    ((_, plan),) = place_in_turn(start, [vf_request("r1", "x")])
    assert isinstance(plan, Plan)
    (a,) = plan.assignments
    assert isinstance(a, VfAssignment) and (a.vf_index, a.vf_address) == (1, VF1)


def test_an_allocated_vf_is_not_an_mdev_parent_with_room() -> None:
    # VF 0 held by a placement the agent has not carried out yet.
    state = vgpu_host()
    held = HostState(
        state.view, 2, allocations={vf_slot(PF, 0): PlacementId("pl-x")},
        tenants={PlacementId("pl-x"): TenantName("x")},
    )  # fmt: skip
    ((_, plan),) = place_in_turn(snapshot_of(held), [mdev_request("r1", "y")])
    assert isinstance(plan, Plan)
    (a,) = plan.assignments
    assert isinstance(a, MdevAssignment) and a.parent_address == VF1


def test_one_request_never_takes_a_vf_and_an_mdev_on_that_vf() -> None:
    start = snapshot_of(vgpu_host())
    request = PlacementRequest(
        RequestId("r1"), TenantName("x"),
        (Claim("vf", DeviceKind.GPU, 1, frozenset({DeviceForm.VF}),
               min_isolation=Isolation.SHARED),
         Claim("vgpu", DeviceKind.GPU, 1, frozenset({DeviceForm.MDEV}),
               mdev_types=frozenset({VGPU}), min_isolation=Isolation.SHARED)),
    )  # fmt: skip
    results = place_in_turn(start, [request])
    used = vf_functions_used(results)
    assert len(used) == len(set(used))
    assert check_placements(start, placed(results)) == []


def test_a_batch_never_gives_one_vf_function_to_a_vf_and_an_mdev_claim() -> None:
    start = snapshot_of(vgpu_host())
    requests = [vf_request("a", "x"), mdev_request("b", "y"), vf_request("c", "z")]
    result = solve_batch(Engine(), start, requests, BatchSettings(workers=1, time_limit_s=5))
    plans = [(r, result.plans[r.request_id]) for r in requests if r.request_id in result.plans]
    order = {rid: i for i, rid in enumerate(result.plans)}
    plans.sort(key=lambda rp: order[rp[0].request_id])
    used = vf_functions_used(plans)
    assert len(used) == len(set(used))
    assert check_placements(start, plans) == []


def test_a_whole_device_claim_and_a_vf_claim_never_share_a_vf_group() -> None:
    # VF0 shares its group with another GPU: passing that GPU through takes VF0 too.
    start = snapshot_of(vgpu_host(neighbour_of_vf0=True))
    whole_first = place_in_turn(start, [whole_request("r1", "x"), vf_request("r2", "y")])
    (_, whole), (_, vf) = whole_first
    assert isinstance(whole, Plan) and isinstance(vf, Plan)
    assert [a.address for a in whole.assignments if isinstance(a, WholeDeviceAssignment)] == [
        NEIGHBOUR
    ]
    assert vf_functions_used(whole_first) == [VF1]
    assert check_placements(start, placed(whole_first)) == []

    vf_first = place_in_turn(start, [vf_request("r1", "x"), whole_request("r2", "y")])
    (_, vf), (_, refused) = vf_first
    assert vf_functions_used(vf_first) == [VF0]
    assert isinstance(refused, Unschedulable)
    assert check_placements(start, placed(vf_first)) == []


# --- (2) the independent checker -----------------------------------------------


def test_the_checker_flags_a_vf_and_an_mdev_on_that_vf() -> None:
    start = snapshot_of(vgpu_host())
    host = next(iter(start.hosts))
    vf = Plan(
        host_id=host, expected_alloc_generation=1,
        assignments=(VfAssignment(claim="g", pf_address=PF, vf_index=0, vf_address=VF0,
                                  iommu_group=IommuGroupNumber(11), numa_node=0, num_vfs=2,
                                  vfio_driver="vfio-pci"),),
        slots=(vf_slot(PF, 0),),
    )  # fmt: skip
    uuid = "11111111-2222-4333-8444-555555555555"
    mdev = Plan(
        host_id=host, expected_alloc_generation=2,
        assignments=(MdevAssignment(claim="g", parent_address=VF0, type_id=VGPU, uuid=uuid,
                                    numa_node=0),),
        slots=(mdev_slot(VF0, VGPU, uuid),),
    )  # fmt: skip
    # Each alone is fine; together, VF0 serves two tenants.
    assert check_placements(start, [(vf_request("r1", "x"), vf)]) == []
    assert check_placements(start, [(mdev_request("r2", "y"), mdev)]) == []
    found = check_placements(start, [(vf_request("r1", "x"), vf), (mdev_request("r2", "y"), mdev)])
    assert [(v.request_id, v.rule) for v in found] == [("r2", RULE_INTERFERENCE)], found
    assert VF0 in found[0].detail


def test_the_checker_flags_a_held_vf_beside_an_mdev_in_the_snapshot() -> None:
    state = vgpu_host(live_mdev_on=VF0)
    held = HostState(
        state.view, 2, allocations={vf_slot(PF, 0): PlacementId("pl-x")},
        tenants={PlacementId("pl-x"): TenantName("x")},
    )  # fmt: skip
    found = check_placements(snapshot_of(held), [])
    assert [(v.request_id, v.rule) for v in found] == [(None, RULE_INTERFERENCE)], found


def test_the_checker_flags_a_whole_group_holding_a_held_vf() -> None:
    state = vgpu_host(neighbour_of_vf0=True)
    held = HostState(
        state.view, 2, allocations={vf_slot(PF, 0): PlacementId("pl-x")},
        tenants={PlacementId("pl-x"): TenantName("x")},
    )  # fmt: skip
    group = IommuGroupNumber(11)
    whole = Plan(
        host_id=held.view.host_id, expected_alloc_generation=2,
        assignments=(WholeDeviceAssignment(claim="g", address=NEIGHBOUR, iommu_group=group,
                                           group_endpoints=held.view.group_endpoints(group),
                                           numa_node=0, vfio_path=vfio_group_path(group)),),
        slots=(iommu_group_slot(group),),
    )  # fmt: skip
    found = check_placements(snapshot_of(held), [(whole_request("r2", "y"), whole)])
    assert found and {v.rule for v in found} <= {RULE_IOMMU_ISOLATION, RULE_INTERFERENCE}
    assert all(v.request_id == "r2" for v in found)


# --- (3) an mdev on one VF leaves the other VFs free ---------------------------


def test_an_mdev_on_vf1_does_not_block_vf0() -> None:
    uuid = "11111111-2222-4333-8444-555555555555"
    state = vgpu_host()
    held = HostState(
        state.view, 2, allocations={mdev_slot(VF1, VGPU, uuid): PlacementId("pl-y")},
        tenants={PlacementId("pl-y"): TenantName("y")},
    )  # fmt: skip
    ((request, plan),) = place_in_turn(snapshot_of(held), [vf_request("r1", "x")])
    assert isinstance(plan, Plan)
    (a,) = plan.assignments
    assert isinstance(a, VfAssignment) and (a.vf_index, a.vf_address) == (0, VF0)
    assert check_placements(snapshot_of(held), [(request, plan)]) == []


def test_a_live_mdev_on_vf1_does_not_block_vf0() -> None:
    start = snapshot_of(vgpu_host(live_mdev_on=VF1))
    ((request, plan),) = place_in_turn(start, [vf_request("r1", "x")])
    assert isinstance(plan, Plan)
    (a,) = plan.assignments
    assert isinstance(a, VfAssignment) and a.vf_index == 0
    assert check_placements(start, [(request, plan)]) == []


def test_a_batch_counts_the_vgpu_capacity_of_gpu_vfs_in_its_bound() -> None:
    """On SR-IOV vGPU the mdev parents are the GPU's VFs (its PF is in VF use).

    The batch's capacity bound once counted only whole GPUs, so these hosts
    held no GPU capacity in it: a greedy that placed two of three vGPU
    requests met that bound and stood as OPTIMAL without a model, although
    all three fit (the free one on the second host).
    """

    def host(host_id: str, zone: str) -> HostState:
        state = vgpu_host()
        view = replace(state.view, host_id=HostId(host_id), labels={"zone": zone})
        return HostState(view, 1)

    snap = ClusterSnapshot(hosts={HostId(h): host(h, z) for h, z in (("h1", "a"), ("h2", "b"))})
    requests = [mdev_request("r0", "t0")] + [
        replace(mdev_request(f"r{i}", f"t{i}"), host_selector={"zone": "a"}) for i in (1, 2)
    ]
    result = solve_batch(Engine(), snap, requests, BatchSettings(workers=1, time_limit_s=5))
    assert set(result.plans) == {"r0", "r1", "r2"}
    assert result.objective <= result.bound
