"""The independent validity checker: one test per invariant, named after its rule.

Each test shows a valid placement passing and hand-made violating plans caught
under that rule's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.checker import (
    ALL_RULES,
    RULE_AFFINITY,
    RULE_CAPACITY,
    RULE_DEVICE_MATCH,
    RULE_EXCLUSIVITY,
    RULE_HOST_SELECTOR,
    RULE_INTERFERENCE,
    RULE_IOMMU_ISOLATION,
    RULE_MDEV_HOMOGENEITY,
    RULE_MIGRATABILITY,
    RULE_NUMA,
    RULE_SLOTS,
    Violation,
    check_placements,
)
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    RequestId,
    SlotKey,
    TenantName,
    iommu_group_slot,
    vfio_group_path,
)
from tessera.scheduler.core.mig import MIG_TABLES, GpuInstance
from tessera.scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    MigAssignment,
    Plan,
    VfAssignment,
    WholeDeviceAssignment,
)
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    DeviceSelector,
    ExclusivityDomain,
    Isolation,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.slots import exclusive_slot, mdev_slot, mig_slot, vf_slot
from tessera.scheduler.core.snapshot import ClusterSnapshot

from .checker_topologies import (
    A16,
    A100,
    GPU_A,
    GPU_B,
    GPU_HOST_USE,
    GPU_WITH_USB,
    LIVE_MDEV_UUID,
    MDEV_GPU,
    MDEV_SINGLE,
    MIG_GPU,
    PF_EMPTY,
    PF_ENABLED,
    SWITCH_USP,
    VF_1,
    VF_MIGRATION_DRIVER,
    cluster,
    mixed,
)
from .topologies import dgx, workstation

HOST = mixed()
EMPTY = cluster(HOST)

# --- builders ---------------------------------------------------------------


def uuid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def gpu(name: str = "gpu", count: int = 1, **kw: object) -> Claim:
    return Claim(name, DeviceKind.GPU, count, **kw)  # type: ignore[arg-type]


def nic(name: str = "nic", count: int = 1, **kw: object) -> Claim:
    forms = frozenset({DeviceForm.VF})
    return Claim(name, DeviceKind.NIC, count, forms, min_isolation=Isolation.SHARED, **kw)  # type: ignore[arg-type]


def vgpu(name: str = "vgpu", count: int = 1, **kw: object) -> Claim:
    forms = frozenset({DeviceForm.MDEV})
    return Claim(name, DeviceKind.GPU, count, forms, min_isolation=Isolation.SHARED, **kw)  # type: ignore[arg-type]


def migc(name: str = "mig", count: int = 1, **kw: object) -> Claim:
    forms = frozenset({DeviceForm.MIG})
    return Claim(name, DeviceKind.GPU, count, forms, min_isolation=Isolation.PARTITIONED, **kw)  # type: ignore[arg-type]


def request(*claims: Claim, rid: str = "r1", tenant: str = "t1", **kw: object) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName(tenant), claims, **kw)  # type: ignore[arg-type]


def whole(address: str, claim: str = "gpu", view: HostView = HOST) -> WholeDeviceAssignment:
    fn = view.functions[PciAddress(address)]
    assert fn.iommu_group is not None
    return WholeDeviceAssignment(
        claim=claim,
        address=fn.address,
        iommu_group=fn.iommu_group,
        group_endpoints=view.group_endpoints(fn.iommu_group),
        numa_node=fn.numa_node,
        vfio_path=vfio_group_path(fn.iommu_group),
    )


def vf(
    pf: str, index: int, claim: str = "nic", driver: str = "vfio-pci", num_vfs: int = 0
) -> VfAssignment:
    pf_view = HOST.sriov_pfs[PciAddress(pf)]
    existing = next((v for v in pf_view.vfs if v.index == index), None)
    return VfAssignment(
        claim=claim,
        pf_address=PciAddress(pf),
        vf_index=index,
        vf_address=existing.address if existing else None,
        iommu_group=existing.iommu_group if existing else None,
        numa_node=HOST.functions[PciAddress(pf)].numa_node,
        num_vfs=num_vfs or max(pf_view.num_vfs, index + 1),
        vfio_driver=driver,
    )


def mdev(parent: str, type_id: str, n: int, claim: str = "vgpu") -> MdevAssignment:
    return MdevAssignment(
        claim=claim,
        parent_address=PciAddress(parent),
        type_id=type_id,
        uuid=uuid(n),
        numa_node=HOST.functions[PciAddress(parent)].numa_node,
    )


def mig(profile: str, start: int, claim: str = "mig", size: int = 0) -> MigAssignment:
    p = next(p for p in MIG_TABLES["H100-80GB"] if p.name == profile)
    size = size or next((sz for st, sz in p.placements if st == start), p.placements[0][1])
    return MigAssignment(
        claim=claim,
        gpu_address=MIG_GPU,
        profile_name=p.name,
        profile_id=p.profile_id,
        start=start,
        size=size,
        numa_node=HOST.functions[MIG_GPU].numa_node,
    )


def unit_slot(a: Assignment) -> SlotKey:
    if isinstance(a, WholeDeviceAssignment):
        return iommu_group_slot(a.iommu_group)
    if isinstance(a, VfAssignment):
        return vf_slot(a.pf_address, a.vf_index)
    if isinstance(a, MdevAssignment):
        return mdev_slot(a.parent_address, a.type_id, a.uuid)
    return mig_slot(a.gpu_address, a.profile_id, a.start, a.size)


def plan(
    *assignments: Assignment,
    host: str = "mixed",
    slots: tuple[str, ...] | None = None,
    exclusive: tuple[str, ...] = (),
) -> Plan:
    keys = tuple(unit_slot(a) for a in assignments) if slots is None else slots
    return Plan(
        host_id=HostId(host),
        expected_alloc_generation=1,
        slots=tuple(SlotKey(s) for s in (*keys, *exclusive)),
        assignments=assignments,
    )


def check(
    *placements: tuple[PlacementRequest, Plan], snapshot: ClusterSnapshot = EMPTY
) -> list[Violation]:
    return check_placements(snapshot, placements)


def rules(
    *placements: tuple[PlacementRequest, Plan], snapshot: ClusterSnapshot = EMPTY
) -> set[str]:
    return {v.rule for v in check(*placements, snapshot=snapshot)}


def taken(slots: Mapping[str, str], tenants: Mapping[str, str] | None = None) -> ClusterSnapshot:
    """The mixed host with these slots allocated (slot -> placement)."""
    return cluster(HOST, allocations={"mixed": slots}, tenants=tenants or {})


# --- general ----------------------------------------------------------------


def test_rule_names_are_stable_and_kebab_case() -> None:
    assert ALL_RULES == (
        "slots",
        "iommu-isolation",
        "device-match",
        "interference",
        "capacity",
        "mdev-homogeneity",
        "migratability",
        "numa",
        "affinity",
        "exclusivity",
        "host-selector",
    )


def test_every_form_together_is_valid() -> None:
    req = request(gpu(), nic(), vgpu(), migc())
    p = plan(whole(GPU_A), vf(PF_EMPTY, 0), mdev(MDEV_GPU, "nvidia-1", 1), mig("1g.10gb", 0))
    assert check((req, p)) == []


def test_whole_device_plans_on_named_topologies_pass() -> None:
    ws, big = workstation("ws"), dgx("dgx")
    snap = cluster(ws, big)
    a = whole("0000:01:00.0", view=ws)
    b = whole("0000:07:00.0", view=big)
    c = whole("0000:0f:00.0", view=big)
    req = request(gpu(count=2), rid="r2", numa_policy=NumaPolicy.SINGLE_NUMA_NODE)
    assert (
        check((request(gpu()), plan(a, host="ws")), (req, plan(b, c, host="dgx")), snapshot=snap)
        == []
    )


def test_violations_of_the_snapshot_itself_have_no_request() -> None:
    snap = taken({"iommu-group:21": "p1", vf_slot(PF_ENABLED, 5): "p2"})
    found = check(snapshot=snap)
    assert found and all(v.request_id is None for v in found)
    assert {v.rule for v in found} == {RULE_IOMMU_ISOLATION, RULE_INTERFERENCE, RULE_CAPACITY}


def test_a_later_placement_is_judged_against_the_earlier_ones() -> None:
    first = (request(gpu(), rid="r1"), plan(whole(GPU_A)))
    second = (request(gpu(), rid="r2", tenant="t2"), plan(whole(GPU_A)))
    found = check(first, second)
    assert found
    assert {v.request_id for v in found} == {RequestId("r2")}
    assert RULE_SLOTS in {v.rule for v in found}


# --- one test per rule ------------------------------------------------------


def test_slots() -> None:
    req = request(gpu(count=2))
    good = plan(whole(GPU_A), whole(GPU_B))
    assert check((req, good)) == []
    # A slot already held by an existing placement.
    assert RULE_SLOTS in rules((req, good), snapshot=taken({"iommu-group:10": "p0"}))
    # The same slot twice within one plan.
    assert RULE_SLOTS in rules((req, plan(whole(GPU_A), whole(GPU_A))))
    # Plan slots that are not what the assignments imply.
    assert rules((req, plan(whole(GPU_A), whole(GPU_B), slots=("iommu-group:10",)))) == {RULE_SLOTS}
    extra = plan(whole(GPU_A), whole(GPU_B), exclusive=("iommu-group:30",))
    assert RULE_SLOTS in rules((req, extra))
    # Exclusivity wider than NONE needs its exclusive slots.
    excl = request(gpu(), exclusivity=ExclusivityDomain.NUMA_NODE)
    assert rules((excl, plan(whole(GPU_A)))) == {RULE_SLOTS}
    numa0 = exclusive_slot(ExclusivityDomain.NUMA_NODE, "0", RequestId("r1"))
    assert check((excl, plan(whole(GPU_A), exclusive=(numa0,)))) == []
    # Assignment count per claim, and claims the request does not have.
    assert rules((req, plan(whole(GPU_A)))) == {RULE_SLOTS}
    assert rules((request(gpu()), plan(whole(GPU_A, claim="other")))) == {RULE_SLOTS}
    # An unknown or unschedulable host.
    assert rules((request(gpu()), plan(whole(GPU_A), host="nowhere"))) == {RULE_SLOTS}
    down = cluster(HOST, unschedulable=frozenset({"mixed"}))
    assert rules((request(gpu()), plan(whole(GPU_A))), snapshot=down) == {RULE_SLOTS}


def test_iommu_isolation() -> None:
    req = request(gpu())
    assert check((req, plan(whole(GPU_A)))) == []
    # group_endpoints must list exactly the group's non-bridge members.
    bad = WholeDeviceAssignment("gpu", GPU_WITH_USB, IommuGroupNumber(60), (GPU_WITH_USB,), 0, "")
    assert RULE_IOMMU_ISOLATION in rules((req, plan(bad)))
    wrong = WholeDeviceAssignment("gpu", GPU_A, IommuGroupNumber(10), (GPU_B,), 0, "")
    assert RULE_IOMMU_ISOLATION in rules((req, plan(wrong)))
    # A group holding a host device (USB) or a function in host use.
    assert rules((req, plan(whole(GPU_WITH_USB)))) == {RULE_IOMMU_ISOLATION}
    assert rules((req, plan(whole(GPU_HOST_USE)))) == {RULE_IOMMU_ISOLATION}
    # No IOMMU on the host.
    no_iommu = cluster(replace(HOST, iommu_present=False))
    assert rules((req, plan(whole(GPU_A))), snapshot=no_iommu) == {RULE_IOMMU_ISOLATION}
    # MIG instances are isolated by the GPU, not the IOMMU: they need none.
    mig_plan = plan(mig("3g.40gb", 0))
    assert rules((request(migc()), mig_plan), snapshot=no_iommu) == set()
    # A VF the host uses itself is never handed over.
    vf1 = HOST.functions[VF_1]
    host_vf = replace(HOST, functions={**HOST.functions, VF_1: replace(vf1, host_use="uplink")})
    assert check((request(nic()), plan(vf(PF_ENABLED, 1)))) == []
    assert rules((request(nic()), plan(vf(PF_ENABLED, 1))), snapshot=cluster(host_vf)) == {
        RULE_IOMMU_ISOLATION
    }
    # A PF with VFs enabled, or with VF slots held, is never taken whole.
    nic_whole = request(Claim("nic", DeviceKind.NIC, 1))
    assert check((nic_whole, plan(whole(PF_EMPTY, claim="nic")))) == []
    assert RULE_IOMMU_ISOLATION in rules((nic_whole, plan(whole(PF_ENABLED, claim="nic"))))
    vf_held = taken({vf_slot(PF_EMPTY, 0): "p0"}, {"p0": "t0"})
    assert RULE_IOMMU_ISOLATION in rules(
        (nic_whole, plan(whole(PF_EMPTY, claim="nic"))), snapshot=vf_held
    )
    # A VF's own group taken whole while the VF is allocated.
    vf0 = HOST.functions[PciAddress("0000:11:00.1")]
    assert vf0.iommu_group is not None
    vf_group = WholeDeviceAssignment(
        "nic", vf0.address, vf0.iommu_group, (vf0.address,), 1, vfio_group_path(vf0.iommu_group)
    )
    used_vf = taken({vf_slot(PF_ENABLED, 0): "p0"}, {"p0": "t0"})
    assert RULE_IOMMU_ISOLATION in rules((nic_whole, plan(vf_group)), snapshot=used_vf)


def test_device_match() -> None:
    a100 = DeviceSelector(vendor_id=0x10DE, models=frozenset({A100}))
    assert check((request(gpu(selector=a100)), plan(whole(GPU_A)))) == []
    # Wrong kind: a NIC claim on a GPU.
    nic_whole = request(Claim("nic", DeviceKind.NIC, 1))
    assert rules((nic_whole, plan(whole(GPU_A, claim="nic")))) == {RULE_DEVICE_MATCH}
    # Selector: model, vendor, device id; for VFs and mdevs the PF's/parent's.
    a16 = DeviceSelector(models=frozenset({A16}))
    assert rules((request(gpu(selector=a16)), plan(whole(GPU_A)))) == {RULE_DEVICE_MATCH}
    intel = DeviceSelector(vendor_id=0x8086)
    assert rules((request(nic(selector=intel)), plan(vf(PF_EMPTY, 0)))) == {RULE_DEVICE_MATCH}
    ids = DeviceSelector(device_ids=frozenset({0x1234}))
    mdev_req = request(vgpu(selector=ids))
    assert rules((mdev_req, plan(mdev(MDEV_GPU, "nvidia-1", 1)))) == {RULE_DEVICE_MATCH}
    ok = request(vgpu(selector=DeviceSelector(models=frozenset({A16}))))
    assert check((ok, plan(mdev(MDEV_GPU, "nvidia-1", 1)))) == []


def test_interference() -> None:
    req = request(vgpu())
    assert check((req, plan(mdev(MDEV_GPU, "nvidia-1", 1)))) == []
    # A form the claim does not accept, or accepts only below its isolation.
    assert rules((request(gpu()), plan(mdev(MDEV_GPU, "nvidia-1", 1, claim="gpu")))) == {
        RULE_INTERFERENCE
    }
    strict = Claim("nic", DeviceKind.NIC, 1, frozenset({DeviceForm.VF}))
    assert rules((request(strict), plan(vf(PF_EMPTY, 0)))) == {RULE_INTERFERENCE}
    # One device, one mode: mdev on a GPU another placement has whole.
    whole_a16 = taken({"iommu-group:30": "p0"}, {"p0": "t0"})
    assert RULE_INTERFERENCE in rules(
        (req, plan(mdev(MDEV_GPU, "nvidia-1", 1))), snapshot=whole_a16
    )
    # ...and across two new placements, whatever the tenants.
    first = (request(vgpu(), rid="r1"), plan(mdev(MDEV_GPU, "nvidia-1", 1)))
    second = (request(gpu(), rid="r2"), plan(whole(MDEV_GPU)))
    assert RULE_INTERFERENCE in rules(first, second)
    # A MIG-enabled GPU hosts no mdev; MIG only where MIG is on.
    assert RULE_INTERFERENCE in rules((req, plan(mdev(MIG_GPU, "nvidia-h", 1))))
    not_mig = MigAssignment("mig", GPU_A, "1g.10gb", 19, 0, 1, 0)
    assert rules((request(migc()), plan(not_mig))) == {RULE_INTERFERENCE}
    # A live MIG instance puts the GPU in MIG mode: no whole device then.
    assert RULE_INTERFERENCE in rules((request(gpu()), plan(whole(MIG_GPU))))


def test_capacity() -> None:
    assert check((request(nic(count=2)), plan(vf(PF_EMPTY, 0), vf(PF_EMPTY, 7)))) == []
    # VF index within total_vfs, and within num_vfs once VFs are enabled.
    assert RULE_CAPACITY in rules((request(nic()), plan(vf(PF_EMPTY, 8))))
    assert RULE_CAPACITY in rules((request(nic()), plan(vf(PF_ENABLED, 2))))
    # No VF index twice.
    first = (request(nic(), rid="r1"), plan(vf(PF_EMPTY, 3)))
    second = (request(nic(), rid="r2"), plan(vf(PF_EMPTY, 3)))
    assert RULE_CAPACITY in rules(first, second)
    # mdev: the claim's types, the parent's types, per-type and shared room.
    only_2 = request(vgpu(mdev_types=frozenset({"nvidia-2"})))
    assert rules((only_2, plan(mdev(MDEV_GPU, "nvidia-1", 1)))) == {RULE_CAPACITY}
    assert RULE_CAPACITY in rules((request(vgpu()), plan(mdev(MDEV_GPU, "nvidia-9", 1))))
    three = plan(*(mdev(MDEV_GPU, "nvidia-2", n) for n in range(3)))
    assert rules((request(vgpu(count=3)), three)) == {RULE_CAPACITY}
    full_share = plan(
        *(mdev(MDEV_GPU, "nvidia-1", n) for n in range(2)), mdev(MDEV_GPU, "nvidia-2", 2)
    )
    assert check((request(vgpu(count=3)), full_share)) == []
    over_share = plan(
        *(mdev(MDEV_GPU, "nvidia-1", n) for n in range(3)), mdev(MDEV_GPU, "nvidia-2", 3)
    )
    assert rules((request(vgpu(count=4)), over_share)) == {RULE_CAPACITY}
    # MIG: claim's profiles, allowed placements, overlap with the live 3g at 4+4,
    # compute budget, per-profile limits.
    assert check((request(migc()), plan(mig("3g.40gb", 0)))) == []
    wants_1g = request(migc(mig_profiles=frozenset({"1g.10gb"})))
    assert rules((wants_1g, plan(mig("2g.20gb", 0)))) == {RULE_CAPACITY}
    assert rules((request(migc()), plan(mig("2g.20gb", 1, size=2)))) == {RULE_CAPACITY}
    assert rules((request(migc()), plan(mig("1g.10gb", 4)))) == {RULE_CAPACITY}
    assert check((request(migc()), plan(mig("4g.40gb", 0)))) == []
    # Compute: a live instance reported with 5 compute slices leaves 2.
    gpu_view = replace(
        HOST.gpus[MIG_GPU], gpu_instances=(GpuInstance(start=4, size=4, profile_id=9, slices=5),)
    )
    greedy = cluster(replace(HOST, gpus={**HOST.gpus, MIG_GPU: gpu_view}))
    assert rules((request(migc()), plan(mig("3g.40gb", 0))), snapshot=greedy) == {RULE_CAPACITY}
    assert check((request(migc()), plan(mig("2g.20gb", 0))), snapshot=greedy) == []
    twice = plan(mig("1g.10gb+me", 0), mig("1g.10gb+me", 1))
    assert rules((request(migc(count=2)), twice)) == {RULE_CAPACITY}
    # An allocated instance the agent already created counts once.
    created = taken({mig_slot(MIG_GPU, 9, 4, 4): "p0"}, {"p0": "t0"})
    assert check((request(migc()), plan(mig("3g.40gb", 0))), snapshot=created) == []


def test_mdev_homogeneity() -> None:
    # The single-type parent has one live nvidia-1.
    assert check((request(vgpu()), plan(mdev(MDEV_SINGLE, "nvidia-1", 1)))) == []
    assert rules((request(vgpu()), plan(mdev(MDEV_SINGLE, "nvidia-2", 1)))) == {
        RULE_MDEV_HOMOGENEITY
    }
    # Mixed types are fine on a parent that allows them.
    mixed_types = plan(mdev(MDEV_GPU, "nvidia-1", 1), mdev(MDEV_GPU, "nvidia-2", 2))
    assert check((request(vgpu(count=2)), mixed_types)) == []
    # An allocated mdev the agent already created is counted once.
    created = taken({mdev_slot(MDEV_SINGLE, "nvidia-1", LIVE_MDEV_UUID): "p0"}, {"p0": "t0"})
    assert check((request(vgpu()), plan(mdev(MDEV_SINGLE, "nvidia-1", 1))), snapshot=created) == []
    assert rules((request(vgpu()), plan(mdev(MDEV_SINGLE, "nvidia-2", 1))), snapshot=created) == {
        RULE_MDEV_HOMOGENEITY
    }


def test_migratability() -> None:
    # Migratable mdev type, and a VF on the variant driver its function names.
    assert check((request(vgpu(migratable=True)), plan(mdev(MDEV_GPU, "nvidia-1", 1)))) == []
    good_vf = vf(PF_ENABLED, 0, driver=VF_MIGRATION_DRIVER)
    assert check((request(nic(migratable=True)), plan(good_vf))) == []
    # Whole devices and MIG instances cannot migrate.
    assert rules((request(gpu(migratable=True)), plan(whole(GPU_A)))) == {RULE_MIGRATABILITY}
    assert rules((request(migc(migratable=True)), plan(mig("3g.40gb", 0)))) == {RULE_MIGRATABILITY}
    # An mdev type not marked migratable.
    assert rules((request(vgpu(migratable=True)), plan(mdev(MDEV_GPU, "nvidia-2", 1)))) == {
        RULE_MIGRATABILITY
    }
    # VFs: plain vfio-pci, no driver, or a driver the VF does not migrate with.
    for driver in ("vfio-pci", "", "other_vfio_pci"):
        a = vf(PF_ENABLED, 0, driver=driver)
        assert rules((request(nic(migratable=True)), plan(a))) == {RULE_MIGRATABILITY}
    # Not asked to migrate: plain vfio-pci is fine.
    assert check((request(nic()), plan(vf(PF_ENABLED, 1)))) == []


def test_migratability_of_a_vf_not_created_yet_is_its_pfs_word() -> None:
    # PF_EMPTY has no VFs; it reports none of them could migrate, until it
    # names the variant driver of its VF id.
    nic_vf = (request(nic(migratable=True)), plan(vf(PF_EMPTY, 0, driver=VF_MIGRATION_DRIVER)))
    assert rules(nic_vf) == {RULE_MIGRATABILITY}
    pf = HOST.sriov_pfs[PF_EMPTY]
    future = replace(
        HOST,
        sriov_pfs={
            **HOST.sriov_pfs,
            PF_EMPTY: replace(pf, vf_migration_driver=VF_MIGRATION_DRIVER),
        },
    )
    assert check(nic_vf, snapshot=cluster(future)) == []
    for driver in ("vfio-pci", "other_vfio_pci"):
        other = (request(nic(migratable=True)), plan(vf(PF_EMPTY, 0, driver=driver)))
        assert rules(other, snapshot=cluster(future)) == {RULE_MIGRATABILITY}
    # An existing VF answers for itself: PF_ENABLED's VFs migrate with
    # mlx5_vfio_pci whatever the PF says of VFs in general.
    enabled = replace(HOST.sriov_pfs[PF_ENABLED], vf_migration_driver="other_vfio_pci")
    other_word = replace(HOST, sriov_pfs={**HOST.sriov_pfs, PF_ENABLED: enabled})
    good_vf = (request(nic(migratable=True)), plan(vf(PF_ENABLED, 0, driver=VF_MIGRATION_DRIVER)))
    assert check(good_vf, snapshot=cluster(other_word)) == []


def test_numa() -> None:
    single = request(gpu(count=2), numa_policy=NumaPolicy.SINGLE_NUMA_NODE)
    assert check((single, plan(whole(GPU_A), whole(GPU_B)))) == []
    # GPU_A is on node 0, the mdev parent on node 2.
    two = request(gpu(), vgpu(), numa_policy=NumaPolicy.SINGLE_NUMA_NODE)
    assert rules((two, plan(whole(GPU_A), mdev(MDEV_GPU, "nvidia-1", 1)))) == {RULE_NUMA}
    # Socket: nodes 0 and 1 share a socket, node 2 is the other one.
    sock = request(gpu(), nic(), numa_policy=NumaPolicy.SOCKET)
    assert check((sock, plan(whole(GPU_A), vf(PF_EMPTY, 0)))) == []
    sock2 = request(gpu(), vgpu(), numa_policy=NumaPolicy.SOCKET)
    assert rules((sock2, plan(whole(GPU_A), mdev(MDEV_GPU, "nvidia-1", 1)))) == {RULE_NUMA}
    # Preferred is no constraint.
    pref = request(gpu(), vgpu(), numa_policy=NumaPolicy.PREFERRED)
    assert check((pref, plan(whole(GPU_A), mdev(MDEV_GPU, "nvidia-1", 1)))) == []
    # An assignment's numa_node is its device's.
    lying = WholeDeviceAssignment(
        "gpu", GPU_A, IommuGroupNumber(10), (GPU_A,), 1, vfio_group_path(IommuGroupNumber(10))
    )
    assert rules((request(gpu()), plan(lying))) == {RULE_NUMA}


def test_affinity() -> None:
    def req(scope: AffinityScope, required: bool = True) -> PlacementRequest:
        return request(gpu("a"), gpu("b"), affinities=(Affinity("a", "b", scope, required),))

    pair = plan(whole(GPU_A, "a"), whole(GPU_B, "b"))
    for scope in AffinityScope:
        assert check((req(scope), pair)) == []
    assert HOST.functions[GPU_A].switch == SWITCH_USP
    # GPU_HOST_USE is on node 0 too, but under another root port and no switch.
    apart = plan(whole(GPU_A, "a"), whole(GPU_WITH_USB, "b"))
    assert RULE_AFFINITY not in rules((req(AffinityScope.SAME_NUMA_NODE), apart))
    assert RULE_AFFINITY in rules((req(AffinityScope.SAME_ROOT_PORT), apart))
    assert RULE_AFFINITY in rules((req(AffinityScope.SAME_SWITCH), apart))
    far = plan(whole(GPU_A, "a"), whole(MDEV_GPU, "b"))
    assert rules((req(AffinityScope.SAME_NUMA_NODE), far)) == {RULE_AFFINITY}
    # Preferred affinities are not invariants.
    assert check((req(AffinityScope.SAME_NUMA_NODE, required=False), far)) == []
    # Every pair of units: two units of "b", one of them far.
    three = request(
        gpu("a"),
        gpu("b", 2),
        affinities=(Affinity("a", "b", AffinityScope.SAME_SWITCH, True),),
    )
    assert rules((three, plan(whole(GPU_A, "a"), whole(GPU_B, "b"), whole(MDEV_GPU, "b")))) == {
        RULE_AFFINITY
    }


def test_exclusivity() -> None:
    numa = ExclusivityDomain.NUMA_NODE

    def excl(instance: str, rid: str = "r1") -> str:
        return exclusive_slot(numa, instance, RequestId(rid))

    req = request(gpu(), exclusivity=numa)
    alone = plan(whole(GPU_A), exclusive=(excl("0"),))
    assert check((req, alone)) == []
    # Another tenant elsewhere is fine; on the same NUMA node it is not.
    other_on_2 = taken({"iommu-group:30": "p0"}, {"p0": "t0"})
    assert check((req, alone), snapshot=other_on_2) == []
    other_on_0 = taken({"iommu-group:11": "p0"}, {"p0": "t0"})
    assert rules((req, alone), snapshot=other_on_0) == {RULE_EXCLUSIVITY}
    # The same tenant may hold the domain with several placements.
    mine_on_0 = taken({"iommu-group:11": "p0"}, {"p0": "t1"})
    assert check((req, alone), snapshot=mine_on_0) == []
    # A placement of an unknown tenant is a stranger.
    assert rules((req, alone), snapshot=taken({"iommu-group:11": "p0"})) == {RULE_EXCLUSIVITY}
    # After: another tenant lands in a domain held exclusively.
    held = taken({"iommu-group:10": "p0", excl("0", "r0"): "p0"}, {"p0": "t0"})
    assert rules((request(gpu()), plan(whole(GPU_B))), snapshot=held) == {RULE_EXCLUSIVITY}
    assert check((request(gpu(), tenant="t0"), plan(whole(GPU_B))), snapshot=held) == []
    assert check((request(vgpu()), plan(mdev(MDEV_GPU, "nvidia-1", 1))), snapshot=held) == []
    # Switch and host domains.
    sw = ExclusivityDomain.PCIE_SWITCH
    sw_req = request(gpu(), exclusivity=sw)
    sw_plan = plan(whole(GPU_A), exclusive=(exclusive_slot(sw, SWITCH_USP, RequestId("r1")),))
    assert check((sw_req, sw_plan), snapshot=other_on_2) == []
    assert rules((sw_req, sw_plan), snapshot=other_on_0) == {RULE_EXCLUSIVITY}
    host = ExclusivityDomain.HOST
    host_req = request(gpu(), exclusivity=host)
    host_plan = plan(whole(GPU_A), exclusive=(exclusive_slot(host, "mixed", RequestId("r1")),))
    assert check((host_req, host_plan)) == []
    assert rules((host_req, host_plan), snapshot=other_on_2) == {RULE_EXCLUSIVITY}
    # Device exclusivity on a shared device: others' mdevs on the same parent.
    dev = ExclusivityDomain.DEVICE
    dev_req = request(vgpu(), exclusivity=dev)
    dev_plan = plan(
        mdev(MDEV_GPU, "nvidia-1", 1), exclusive=(exclusive_slot(dev, MDEV_GPU, RequestId("r1")),)
    )
    assert check((dev_req, dev_plan)) == []
    others_mdev = taken({mdev_slot(MDEV_GPU, "nvidia-1", uuid(9)): "p0"}, {"p0": "t0"})
    assert rules((dev_req, dev_plan), snapshot=others_mdev) == {RULE_EXCLUSIVITY}


def test_host_selector() -> None:
    assert check((request(gpu(), host_selector={"zone": "a"}), plan(whole(GPU_A)))) == []
    both = {"zone": "a", "tier": "gold"}
    assert check((request(gpu(), host_selector=both), plan(whole(GPU_A)))) == []
    assert rules((request(gpu(), host_selector={"zone": "b"}), plan(whole(GPU_A)))) == {
        RULE_HOST_SELECTOR
    }
    assert rules((request(gpu(), host_selector={"rack": "1"}), plan(whole(GPU_A)))) == {
        RULE_HOST_SELECTOR
    }


# --- the engine's plans pass ------------------------------------------------

ENGINE_HOSTS = (mixed("mixed"), dgx("dgx"), workstation("ws"))

#: Claim shapes: (kind, forms, least isolation, mdev types, MIG profiles).
SHAPES = (
    (DeviceKind.GPU, {DeviceForm.WHOLE_DEVICE}, Isolation.EXCLUSIVE, (), ()),
    (DeviceKind.NIC, {DeviceForm.VF, DeviceForm.WHOLE_DEVICE}, Isolation.SHARED, (), ()),
    (DeviceKind.GPU, {DeviceForm.MDEV}, Isolation.SHARED, ("nvidia-1",), ()),
    (DeviceKind.GPU, {DeviceForm.MDEV}, Isolation.SHARED, ("nvidia-2",), ()),
    (DeviceKind.GPU, {DeviceForm.MIG}, Isolation.PARTITIONED, (), ("1g.10gb", "2g.20gb")),
    (DeviceKind.GPU, {DeviceForm.MIG}, Isolation.PARTITIONED, (), ("3g.40gb",)),
    (DeviceKind.GPU, set(DeviceForm), Isolation.SHARED, (), ()),
)


@st.composite
def engine_requests(draw: st.DrawFn, i: int) -> PlacementRequest:
    n = draw(st.integers(1, 2))
    claims = []
    for j in range(n):
        kind, forms, isolation, types, profiles = draw(st.sampled_from(SHAPES))
        claims.append(
            Claim(
                f"c{j}",
                kind,
                draw(st.integers(1, 3)),
                frozenset(forms),
                mdev_types=frozenset(types),
                mig_profiles=frozenset(profiles),
                min_isolation=isolation,
                migratable=draw(st.booleans()) and draw(st.booleans()),
            )
        )
    scope = draw(st.sampled_from([None, *AffinityScope]))
    return PlacementRequest(
        RequestId(f"r{i}"),
        TenantName(draw(st.sampled_from(["t0", "t1", "t2"]))),
        tuple(claims),
        numa_policy=draw(st.sampled_from(list(NumaPolicy))),
        affinities=(Affinity("c0", "c1", scope, True),) if scope and n > 1 else (),
        exclusivity=draw(st.sampled_from(list(ExclusivityDomain))),
    )


def committed(
    snap: ClusterSnapshot, p: Plan, pid: PlacementId, tenant: TenantName
) -> ClusterSnapshot:
    state = snap.hosts[p.host_id]
    return ClusterSnapshot(
        hosts={
            **snap.hosts,
            p.host_id: replace(
                state,
                alloc_generation=state.alloc_generation + 1,
                allocations={**state.allocations, **dict.fromkeys(p.slots, pid)},
                tenants={**state.tenants, pid: tenant},
            ),
        }
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 6))
def test_engine_plans_are_valid(data: st.DataObject, n: int) -> None:
    start = cluster(*ENGINE_HOSTS)
    snap = start
    engine = Engine()
    made: list[tuple[PlacementRequest, Plan]] = []
    for i in range(n):
        req = data.draw(engine_requests(i))
        result = engine.schedule(snap, req)
        if not isinstance(result, Plan):
            continue
        made.append((req, result))
        snap = committed(snap, result, PlacementId(f"new-{i}"), req.tenant)
    assert check_placements(start, made) == []
    # The same allocations, already committed, are a valid snapshot too.
    assert check_placements(snap, []) == []
