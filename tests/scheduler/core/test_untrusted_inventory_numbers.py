"""The engine stays up on inventory numbers the registry would refuse.

Registration checks every inventory now, but the engine does not rely on it:
an inventory stored before the check existed is read by every snapshot. Each
host here is a real fixture inventory with one hostile number, converted the
way the coordinator converts what it reads from the store, unchecked. The
engine must answer (a plan or a refusal) without raising and without memory
that grows with the number.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format

from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.plugins import FreeVfIndexes, free_vfs
from tessera.scheduler.core.identity import (
    HostId,
    PciAddress,
    PlacementId,
    RequestId,
    SlotKey,
    TenantName,
)
from tessera.scheduler.core.mig import MigProfile, MigProfileName
from tessera.scheduler.core.mig_geometry import (
    MigLayout,
    capacity,
    fragmentation_score,
    placements_available,
)
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan, Unschedulable, VfAssignment
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.v1 import inventory_pb2

GOLDEN = Path(__file__).resolve().parents[2] / "agent" / "golden"
#: Memory a call may allocate at its peak, whatever the hostile number: far
#: below what listing 2**32 indexes (tens of GiB) or shifting by 2**32 bits
#: (512 MiB) would take.
PEAK_BOUND = 8 << 20

T = TypeVar("T")


def golden(name: str) -> inventory_pb2.HostInventory:
    data = json.loads((GOLDEN / f"{name}.json").read_text())
    data["bootId"], data["generation"] = f"boot-{name}", "1"
    return json_format.ParseDict(data, inventory_pb2.HostInventory())


def state_of(
    inv: inventory_pb2.HostInventory, allocations: dict[str, str] | None = None
) -> HostState:
    return HostState(
        view=host_view_from_inventory(inv),
        alloc_generation=1,
        allocations={SlotKey(k): PlacementId(v) for k, v in (allocations or {}).items()},
        tenants={PlacementId(v): TenantName("other") for v in (allocations or {}).values()},
    )


def snapshot_of(state: HostState) -> ClusterSnapshot:
    return ClusterSnapshot(hosts={state.view.host_id: state})


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of traced allocations inside the block, in bytes (list of one)."""
    tracemalloc.start()
    out = [0]
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def bounded(call: Callable[[], T]) -> T:
    with peak_memory() as peak:
        result = call()
    assert peak[0] < PEAK_BOUND, f"peak {peak[0]:,} bytes"
    return result


def vfs(count: int) -> PlacementRequest:
    return PlacementRequest(
        request_id=RequestId("r-vf"),
        tenant=TenantName("acme"),
        claims=(
            Claim(
                "v", DeviceKind.NIC, count, frozenset({DeviceForm.VF}),
                min_isolation=Isolation.SHARED,
            ),
        ),
    )  # fmt: skip


def mig(profile: str) -> PlacementRequest:
    return PlacementRequest(
        request_id=RequestId("r-mig"),
        tenant=TenantName("acme"),
        claims=(
            Claim(
                "m", DeviceKind.GPU, 1, frozenset({DeviceForm.MIG}),
                mig_profiles=frozenset({profile}), min_isolation=Isolation.PARTITIONED,
            ),
        ),
    )  # fmt: skip


# -- four billion VFs ------------------------------------------------------------


def huge_pf() -> inventory_pb2.HostInventory:
    """sriov-nic with its first PF claiming 2**32-1 VFs and its other PFs none."""
    inv = golden("sriov-nic")
    for pf in inv.sriov_pfs:
        pf.total_vfs = 0
    inv.sriov_pfs[0].total_vfs = 2**32 - 1
    return inv


def test_a_pf_claiming_four_billion_vfs_counts_them_without_listing_them() -> None:
    inv = huge_pf()
    pf = PciAddress(inv.sriov_pfs[0].address)
    state = state_of(inv, {f"vf:{pf}#0": "pl-a@h", f"vf:{pf}#2": "pl-b@h"})
    occupancy = build_occupancy(state)

    free, driver = bounded(lambda: free_vfs(state.view, occupancy, pf))

    assert driver == "vfio-pci"
    assert len(free) == 2**32 - 1 - 2
    assert [free.pop(0) for _ in range(3)] == [1, 3, 4]
    assert len(free) == 2**32 - 1 - 5


def test_the_engine_places_vfs_on_such_a_pf_in_bounded_memory() -> None:
    inv = huge_pf()
    snapshot = snapshot_of(state_of(inv))
    engine = Engine()

    plan = bounded(lambda: engine.schedule(snapshot, vfs(4), explain=True))

    assert isinstance(plan, Plan)
    units = [a for a in plan.assignments if isinstance(a, VfAssignment)]
    assert {a.pf_address for a in units} == {inv.sriov_pfs[0].address}
    assert [a.vf_index for a in units] == [0, 1, 2, 3]
    batch = bounded(
        lambda: solve_batch(engine, snapshot, [vfs(4)], BatchSettings(workers=1, seed=0))
    )
    assert len(batch.plans) == 1


def test_free_vf_indexes_behave_like_the_list_they_replace() -> None:
    listed = FreeVfIndexes([1, 4, 6])
    assert (len(listed), bool(listed), list(listed)) == (3, True, [1, 4, 6])
    assert listed.pop(0) == 1 and list(listed) == [4, 6]
    counted = FreeVfIndexes(below=5, taken=frozenset({0, 3, 9}))
    assert (len(counted), list(counted)) == (3, [1, 2, 4])
    assert [counted.pop(0), counted.pop(0), counted.pop(0)] == [1, 2, 4]
    assert not counted
    assert not FreeVfIndexes()


# -- MIG profiles of zero slices and placements off the GPU -------------------------


def mig_host(change: Callable[[inventory_pb2.Gpu], None]) -> HostState:
    inv = golden("pcie-a100-mig")
    gpu = next(g for g in inv.gpus if g.mig_profiles)
    gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
    change(gpu)
    return state_of(inv)


def test_a_mig_profile_of_zero_slices_has_no_headroom_and_divides_nothing() -> None:
    zero = MigProfile(MigProfileName("0g.0gb"), 77, 0, ((0, 1), (1, 1)))
    layout = MigLayout()
    assert layout.headroom(zero) == 0
    assert placements_available(layout, zero) == ()
    assert capacity(layout, [zero])[zero.name] == 0
    assert 0.0 <= fragmentation_score(layout, [zero]) <= 1.0

    def zero_slices(gpu: inventory_pb2.Gpu) -> None:
        gpu.mig_profiles[0].slice_count = 0

    state = mig_host(zero_slices)
    engine = Engine()
    profile = state.view.gpus[next(iter(state.view.gpus))].mig_profiles[0]
    assert isinstance(engine.schedule(snapshot_of(state), mig(profile.name)), Unschedulable)
    assert engine.mig_capacity(state)  # what ListHosts shows: no ZeroDivisionError


def test_mig_placements_off_the_gpu_are_never_available_and_cost_nothing() -> None:
    def far_placements(gpu: inventory_pb2.Gpu) -> None:
        for profile in gpu.mig_profiles:
            for placement in profile.placements:
                placement.start = 2**32 - 1
                placement.size = 2**32 - 1

    state = mig_host(far_placements)
    engine = Engine()
    profile = state.view.gpus[next(iter(state.view.gpus))].mig_profiles[0]

    answer = bounded(lambda: engine.schedule(snapshot_of(state), mig(profile.name)))

    assert isinstance(answer, Unschedulable)
    assert bounded(lambda: engine.mig_capacity(state))[0][1][profile.name] == 0


def test_a_placement_listed_a_thousand_times_is_searched_once() -> None:
    def repeated(gpu: inventory_pb2.Gpu) -> None:
        one_g = next(p for p in gpu.mig_profiles if p.slice_count == 1)
        for _ in range(1000):
            one_g.placements.add(start=0, size=1)
        one_g.placements.add(start=7, size=5)  # runs off the GPU

    state = mig_host(repeated)
    engine = Engine()
    [(_, free, _)] = bounded(lambda: engine.mig_capacity(state))
    assert max(free.values()) <= 7


# -- NUMA nodes' CPUs ---------------------------------------------------------------


def test_a_cpulist_naming_its_cpus_hundreds_of_times_is_counted_at_the_cost_of_its_text() -> None:
    # 4 KiB of "0-8191," is a cpulist the registry accepts (every CPU below
    # 8,192, within a sysfs page); expanding each range cost most of a second
    # per node, for every replica that parsed the report.
    inv = golden("gpu-workstation")
    del inv.numa_nodes[:]
    nodes = 64
    for k in range(nodes):
        inv.numa_nodes.add(id=k, cpulist=",".join(["0-8191"] * 585), distances=[10] * nodes)
    started = time.perf_counter()
    view = host_view_from_inventory(inv)
    assert time.perf_counter() - started < 2.0
    assert [n.cpus for n in view.numa_nodes] == [8192] * nodes
    # Overlapping and unordered ranges count each CPU once; what is not a range, nothing.
    inv.numa_nodes[0].cpulist = "8-15,0-9,3,x,²,9-3"
    assert host_view_from_inventory(inv).numa_nodes[0].cpus == 16


# -- mdev limits without a small common multiple ----------------------------------


def test_mdev_limits_without_a_small_common_multiple_still_solve_as_a_batch() -> None:
    inv = golden("vgpu")
    parent = inv.mdev_parents[0]
    primes = [1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117]
    for t, prime in zip(parent.types, primes, strict=False):
        t.description = f"max_instance={prime}"
        t.available_instances = 4
    state = state_of(inv)
    request = PlacementRequest(
        request_id=RequestId("r-mdev"),
        tenant=TenantName("acme"),
        claims=(
            Claim(
                "d", DeviceKind.GPU, 1, frozenset({DeviceForm.MDEV}),
                mdev_types=frozenset({parent.types[0].id}), min_isolation=Isolation.SHARED,
            ),
        ),
    )  # fmt: skip

    result = solve_batch(Engine(), snapshot_of(state), [request], BatchSettings(workers=1, seed=0))

    assert list(result.plans) == ["r-mdev"]
    assert HostId(inv.host_id) in snapshot_of(state).hosts
