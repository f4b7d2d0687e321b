"""Named host topologies for core tests, built directly as domain views.

Each mirrors a fixture host of agent.testing at the level the scheduler sees.
"""

from __future__ import annotations

from tessera.scheduler.core.host import (
    HostView,
    IommuGroupView,
    NumaNodeView,
    PciFunctionView,
    PciRole,
)
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    SlotKey,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState


def _fn(
    address: str,
    *,
    class_code: int,
    group: int | None,
    numa: int,
    chain: tuple[str, ...],
    vendor: int = 0x10DE,
    device: int = 0x20B0,
    role: PciRole = PciRole.ENDPOINT,
    model: str | None = None,
    physfn: str | None = None,
    num_vfs: int = 0,
) -> PciFunctionView:
    return PciFunctionView(
        address=PciAddress(address),
        vendor_id=vendor,
        device_id=device,
        class_code=class_code,
        driver="nvidia",
        numa_node=numa,
        iommu_group=IommuGroupNumber(group) if group is not None else None,
        role=role,
        # The root bus is the bus of the root port above (or of the function
        # itself when it sits directly on a root bus), as sysfs paths have it.
        root_bus="pci0000:" + (chain[0] if chain else address)[5:7],
        bridge_chain=tuple(PciAddress(c) for c in chain),
        physfn=PciAddress(physfn) if physfn else None,
        model=model,
        num_vfs=num_vfs,
    )


def _host(
    host_id: str,
    functions: list[PciFunctionView],
    numa: list[tuple[int, tuple[int, ...]]],
    labels: dict[str, str] | None = None,
    iommu_present: bool = True,
) -> HostView:
    groups: dict[IommuGroupNumber, list[PciAddress]] = {}
    for f in functions:
        if f.iommu_group is not None:
            groups.setdefault(f.iommu_group, []).append(f.address)
    return HostView(
        host_id=HostId(host_id),
        functions={f.address: f for f in functions},
        iommu_groups={g: IommuGroupView(g, tuple(m)) for g, m in groups.items()},
        numa_nodes=tuple(NumaNodeView(n, d) for n, d in numa),
        labels=labels or {},
        iommu_present=iommu_present,
    )


def workstation(host_id: str = "ws") -> HostView:
    """Two GPUs, each sharing one IOMMU group with its HDMI audio function.

    00:01.0 root port (no ACS) ── 01:00.0 GPU  ┐ group 1
                               └─ 01:00.1 audio┘
    00:02.0 root port (no ACS) ── 02:00.0 GPU  ┐ group 2
                               └─ 02:00.1 audio┘
    """
    fns = []
    for bus, group in (("01", 1), ("02", 2)):
        port = f"0000:00:0{group}.0"
        fns.append(
            _fn(port, class_code=0x060400, group=group, numa=0, chain=(), role=PciRole.ROOT_PORT)
        )
        fns.append(
            _fn(f"0000:{bus}:00.0", class_code=0x030000, group=group, numa=0, chain=(port,),
                device=0x2230, model="NVIDIA RTX A6000")
        )  # fmt: skip
        fns.append(
            _fn(f"0000:{bus}:00.1", class_code=0x040300, group=group, numa=0, chain=(port,),
                device=0x1AEF)
        )  # fmt: skip
    return _host(host_id, fns, [(0, (10,))], {"role": "workstation"})


def dgx(host_id: str = "dgx") -> HostView:
    """Eight GPUs in pairs under PCIe switches, two pairs per socket's NUMA nodes.

    NUMA 3: root 00:01.1 ─ USP 01:00.0 ─ DSP 02:00.0 ─┬ USP 05:00.0 ─ DSP ─ GPU 07:00.0
                                                        └ ...               GPU 0f:00.0
    NUMA 1: GPUs 47, 4e   NUMA 7: GPUs 87, 90   NUMA 5: GPUs b7, bd
    """
    pairs = [(3, "07", "0f"), (1, "47", "4e"), (7, "87", "90"), (5, "b7", "bd")]
    fns: list[PciFunctionView] = []
    group = 10
    for numa, a, b in pairs:
        root = f"0000:{a[0]}0:01.1"
        usp = f"0000:{a}:f0.0"
        for bus in (a, b):
            group += 1
            fns.append(
                _fn(f"0000:{bus}:00.0", class_code=0x030200, group=group, numa=numa,
                    chain=(root, usp, f"0000:{bus}:f1.0"), model="NVIDIA A100-SXM4-40GB")
            )  # fmt: skip
    dist = {n: tuple(10 if m == n else (12 if (m < 4) == (n < 4) else 32) for m in range(8))
            for n in range(8)}  # fmt: skip
    return _host(host_id, fns, [(n, dist[n]) for n in range(8)], {"role": "training"})


def snapshot(
    *hosts: HostView,
    taken: dict[str, list[int]] | None = None,
    expired: set[str] | None = None,
) -> ClusterSnapshot:
    """A snapshot with some groups allocated and some leases expired."""
    taken = taken or {}
    expired = expired or set()
    return ClusterSnapshot(
        hosts={
            h.host_id: HostState(
                view=h,
                alloc_generation=7,
                allocations={
                    SlotKey(f"iommu-group:{g}"): PlacementId("pl-x")
                    for g in taken.get(h.host_id, [])
                },
                schedulable=h.host_id not in expired,
            )
            for h in hosts
        }
    )
