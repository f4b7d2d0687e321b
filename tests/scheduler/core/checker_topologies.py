"""A named host with every form (whole device, SR-IOV, mdev, MIG) for checker tests.

``mixed()``: NUMA nodes 0 and 1 form socket 0 (SLIT 12), node 2 is socket 1
(SLIT 32 from both)::

    NUMA 0: root 00:01.0 ─ USP 01:00.0 ─┬ DSP 02:00.0 ─ GPU 03:00.0 (group 10)
                                         └ DSP 02:01.0 ─ GPU 04:00.0 (group 11)
            root 00:06.0 ─ GPU 40:00.0 (group 50, the host's boot display)
            root 00:07.0 ─ GPU 50:00.0 + USB 50:01.0 (group 60)
    NUMA 1: root 00:02.0 ─ NIC PF 10:00.0 (group 20, SR-IOV, 8 VFs, none enabled)
            root 00:03.0 ─ NIC PF 11:00.0 (group 21, 2 VFs enabled: 11:00.1 group
                           22, 11:00.2 group 23, migratable with mlx5_vfio_pci)
    NUMA 2: root 00:04.0 ─ GPU 20:00.0 (group 30, mdev parent, mixed types)
            root 00:05.0 ─ GPU 21:00.0 (group 31, single-type mdev parent, one
                           live nvidia-1)
            root 00:08.0 ─ GPU 30:00.0 (group 40, H100, MIG on, live 3g.40gb at
                           4+4; also offers mdev type nvidia-h)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tessera.scheduler.core.host import (
    GpuView,
    HostView,
    IommuGroupView,
    MdevParentView,
    MdevTypeView,
    NumaNodeView,
    PciFunctionView,
    PciRole,
    SriovPfView,
    VfView,
)
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    SlotKey,
    TenantName,
)
from tessera.scheduler.core.mig import MIG_TABLES, GpuInstance
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

GPU_CLASS = 0x030200
NIC_CLASS = 0x020000
USB_CLASS = 0x0C0330
BRIDGE_CLASS = 0x060400

NVIDIA = 0x10DE
MELLANOX = 0x15B3

A100 = "NVIDIA A100-SXM4-40GB"
A16 = "NVIDIA A16"
H100 = "NVIDIA H100 80GB HBM3"
CX6 = "ConnectX-6 Dx"

# Addresses, by role in mixed().
GPU_A = PciAddress("0000:03:00.0")
GPU_B = PciAddress("0000:04:00.0")
SWITCH_USP = PciAddress("0000:01:00.0")
GPU_HOST_USE = PciAddress("0000:40:00.0")
GPU_WITH_USB = PciAddress("0000:50:00.0")
USB = PciAddress("0000:50:01.0")
PF_EMPTY = PciAddress("0000:10:00.0")
PF_ENABLED = PciAddress("0000:11:00.0")
VF_0 = PciAddress("0000:11:00.1")
VF_1 = PciAddress("0000:11:00.2")
MDEV_GPU = PciAddress("0000:20:00.0")
MDEV_SINGLE = PciAddress("0000:21:00.0")
MIG_GPU = PciAddress("0000:30:00.0")

VF_MIGRATION_DRIVER = "mlx5_vfio_pci"
LIVE_MDEV_UUID = "11111111-0000-0000-0000-000000000001"


def _fn(
    address: str,
    *,
    class_code: int = GPU_CLASS,
    group: int | None,
    numa: int,
    chain: tuple[str, ...],
    vendor: int = NVIDIA,
    device: int = 0x20B0,
    role: PciRole = PciRole.ENDPOINT,
    model: str | None = None,
    physfn: str | None = None,
    num_vfs: int = 0,
    host_use: str | None = None,
    migration_driver: str | None = None,
) -> PciFunctionView:
    return PciFunctionView(
        address=PciAddress(address),
        vendor_id=vendor,
        device_id=device,
        class_code=class_code,
        driver="vfio-pci",
        numa_node=numa,
        iommu_group=IommuGroupNumber(group) if group is not None else None,
        role=role,
        root_bus="pci0000:00",
        bridge_chain=tuple(PciAddress(c) for c in chain),
        physfn=PciAddress(physfn) if physfn else None,
        model=model,
        num_vfs=num_vfs,
        host_use=host_use,
        migration_driver=migration_driver,
    )


def _port(
    address: str, numa: int, role: PciRole = PciRole.ROOT_PORT, chain: tuple[str, ...] = ()
) -> PciFunctionView:
    return _fn(address, class_code=BRIDGE_CLASS, group=None, numa=numa, chain=chain, role=role)


def mixed(host_id: str = "mixed", labels: Mapping[str, str] | None = None) -> HostView:
    """One host offering every form; see the module docstring for its layout."""
    rp1, dsp0, dsp1 = "0000:00:01.0", "0000:02:00.0", "0000:02:01.0"
    fns = [
        _port(rp1, 0),
        _port(SWITCH_USP, 0, PciRole.SWITCH_UPSTREAM, (rp1,)),
        _port(dsp0, 0, PciRole.SWITCH_DOWNSTREAM, (rp1, SWITCH_USP)),
        _port(dsp1, 0, PciRole.SWITCH_DOWNSTREAM, (rp1, SWITCH_USP)),
        _fn(GPU_A, group=10, numa=0, chain=(rp1, SWITCH_USP, dsp0), model=A100),
        _fn(GPU_B, group=11, numa=0, chain=(rp1, SWITCH_USP, dsp1), model=A100),
        _port("0000:00:06.0", 0),
        _fn(GPU_HOST_USE, group=50, numa=0, chain=("0000:00:06.0",), model=A100,
            host_use="boot display"),
        _port("0000:00:07.0", 0),
        _fn(GPU_WITH_USB, group=60, numa=0, chain=("0000:00:07.0",), model=A100),
        _fn(USB, class_code=USB_CLASS, group=60, numa=0, chain=("0000:00:07.0",), vendor=0x8086),
        _port("0000:00:02.0", 1),
        _fn(PF_EMPTY, class_code=NIC_CLASS, group=20, numa=1, chain=("0000:00:02.0",),
            vendor=MELLANOX, device=0x101D, model=CX6),
        _port("0000:00:03.0", 1),
        _fn(PF_ENABLED, class_code=NIC_CLASS, group=21, numa=1, chain=("0000:00:03.0",),
            vendor=MELLANOX, device=0x101D, model=CX6, num_vfs=2),
        _fn(VF_0, class_code=NIC_CLASS, group=22, numa=1, chain=("0000:00:03.0",),
            vendor=MELLANOX, device=0x101E, physfn=PF_ENABLED,
            migration_driver=VF_MIGRATION_DRIVER),
        _fn(VF_1, class_code=NIC_CLASS, group=23, numa=1, chain=("0000:00:03.0",),
            vendor=MELLANOX, device=0x101E, physfn=PF_ENABLED,
            migration_driver=VF_MIGRATION_DRIVER),
        _port("0000:00:04.0", 2),
        _fn(MDEV_GPU, group=30, numa=2, chain=("0000:00:04.0",), device=0x25B6, model=A16),
        _port("0000:00:05.0", 2),
        _fn(MDEV_SINGLE, group=31, numa=2, chain=("0000:00:05.0",), device=0x25B6, model=A16),
        _port("0000:00:08.0", 2),
        _fn(MIG_GPU, group=40, numa=2, chain=("0000:00:08.0",), device=0x2330, model=H100),
    ]  # fmt: skip
    groups: dict[IommuGroupNumber, list[PciAddress]] = {}
    for f in fns:
        if f.iommu_group is not None:
            groups.setdefault(f.iommu_group, []).append(f.address)
    types = {
        "nvidia-1": MdevTypeView("nvidia-1", available=4, max_instances=4, migratable=True),
        "nvidia-2": MdevTypeView("nvidia-2", available=2, max_instances=2),
    }
    near, far = 12, 32
    return HostView(
        host_id=HostId(host_id),
        functions={f.address: f for f in fns},
        iommu_groups={g: IommuGroupView(g, tuple(m)) for g, m in groups.items()},
        numa_nodes=(
            NumaNodeView(0, (10, near, far)),
            NumaNodeView(1, (near, 10, far)),
            NumaNodeView(2, (far, far, 10)),
        ),
        labels=dict(labels) if labels is not None else {"zone": "a", "tier": "gold"},
        sriov_pfs={
            PF_EMPTY: SriovPfView(PF_EMPTY, total_vfs=8, num_vfs=0),
            PF_ENABLED: SriovPfView(
                PF_ENABLED,
                total_vfs=8,
                num_vfs=2,
                vfs=(
                    VfView(0, VF_0, IommuGroupNumber(22)),
                    VfView(1, VF_1, IommuGroupNumber(23)),
                ),
            ),
        },
        mdev_parents={
            MDEV_GPU: MdevParentView(MDEV_GPU, types),
            MDEV_SINGLE: MdevParentView(
                MDEV_SINGLE, types, live={LIVE_MDEV_UUID: "nvidia-1"}, single_type=True
            ),
            MIG_GPU: MdevParentView(
                MIG_GPU, {"nvidia-h": MdevTypeView("nvidia-h", available=1, max_instances=1)}
            ),
        },
        gpus={
            GPU_A: GpuView(GPU_A, A100),
            GPU_B: GpuView(GPU_B, A100),
            MDEV_GPU: GpuView(MDEV_GPU, A16),
            MIG_GPU: GpuView(
                MIG_GPU,
                H100,
                mig_enabled=True,
                mig_profiles=MIG_TABLES["H100-80GB"],
                gpu_instances=(GpuInstance(start=4, size=4, profile_id=9, slices=3),),
            ),
        },
    )


#: vGPU types of :func:`gpu_host`'s vGPU GPUs: a quarter and a half of one.
QUARTER, HALF = "nvidia-q", "nvidia-h2"


def gpu_host(
    host_id: str,
    *,
    mig: Sequence[tuple[GpuInstance, ...]] = (),
    vgpu: Sequence[Mapping[str, str]] = (),
    plain: int = 0,
) -> HostView:
    """A host of GPUs only, each behind its own root port in its own group, on NUMA node 0.

    Args:
        host_id: the host's name.
        mig: per H100 in MIG mode, the GPU instances it holds now.
        vgpu: per A16 offering :data:`QUARTER` and :data:`HALF` (one type
            per GPU), its live mdevs (uuid -> type).
        plain: A100s with no sharing.
    """
    fns: list[PciFunctionView] = []
    gpus: dict[PciAddress, GpuView] = {}
    parents: dict[PciAddress, MdevParentView] = {}
    kinds = ["mig"] * len(mig) + ["vgpu"] * len(vgpu) + ["plain"] * plain
    for n, kind in enumerate(kinds):
        port, address = f"0000:00:{n + 1:02x}.0", PciAddress(f"0000:{n + 0x81:02x}:00.0")
        model = {"mig": H100, "vgpu": A16, "plain": A100}[kind]
        fns += [_port(port, 0), _fn(address, group=100 + n, numa=0, chain=(port,), model=model)]
        gpus[address] = GpuView(address, model)
        if kind == "mig":
            gpus[address] = GpuView(
                address,
                model,
                mig_enabled=True,
                mig_profiles=MIG_TABLES["H100-80GB"],
                gpu_instances=mig[n],
            )
        elif kind == "vgpu":
            types = {
                QUARTER: MdevTypeView(QUARTER, available=4, max_instances=4),
                HALF: MdevTypeView(HALF, available=2, max_instances=2),
            }
            live = dict(vgpu[n - len(mig)])
            parents[address] = MdevParentView(address, types, live=live, single_type=True)
    return HostView(
        host_id=HostId(host_id),
        functions={f.address: f for f in fns},
        iommu_groups={
            f.iommu_group: IommuGroupView(f.iommu_group, (f.address,))
            for f in fns
            if f.iommu_group is not None
        },
        numa_nodes=(NumaNodeView(0, (10,)),),
        labels={},
        mdev_parents=parents,
        gpus=gpus,
    )


def cluster(
    *views: HostView,
    allocations: Mapping[str, Mapping[str, str]] | None = None,
    tenants: Mapping[str, str] | None = None,
    unschedulable: frozenset[str] = frozenset(),
) -> ClusterSnapshot:
    """A snapshot of hosts with allocations (host -> slot -> placement) and tenants."""
    allocations = allocations or {}
    tenant_of = {PlacementId(p): TenantName(t) for p, t in (tenants or {}).items()}
    return ClusterSnapshot(
        hosts={
            v.host_id: HostState(
                view=v,
                alloc_generation=1,
                allocations={
                    SlotKey(k): PlacementId(p) for k, p in allocations.get(v.host_id, {}).items()
                },
                schedulable=v.host_id not in unschedulable,
                tenants=tenant_of,
            )
            for v in views
        }
    )
