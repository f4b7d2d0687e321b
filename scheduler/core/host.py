"""A host as the scheduler sees it: the parts of an inventory placement needs.

Built by the edge from the agent's ``HostInventory``; immutable, so one view
can be shared by concurrent scheduling passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from tessera.scheduler.core.fast_enum import IdentityHashedEnum
from tessera.scheduler.core.identity import HostId, IommuGroupNumber, PciAddress
from tessera.scheduler.core.mig import GpuInstance, MigProfile
from tessera.scheduler.core.request import DeviceKind, ExclusivityDomain


class PciRole(IdentityHashedEnum):
    """Where a function sits in the PCIe hierarchy."""

    ENDPOINT = "endpoint"
    RCIEP = "rciep"
    ROOT_PORT = "root-port"
    SWITCH_UPSTREAM = "switch-upstream"
    SWITCH_DOWNSTREAM = "switch-downstream"
    PCI_BRIDGE = "pci-bridge"

    @property
    def is_bridge(self) -> bool:
        """Bridges stay on their driver; only endpoints are handed to tenants."""
        return self not in (PciRole.ENDPOINT, PciRole.RCIEP)


#: PCI base classes (the top byte of the class code) per device kind.
_KIND_BY_BASE_CLASS: Mapping[int, DeviceKind] = {
    0x03: DeviceKind.GPU,  # display controllers: VGA, 3D
    0x02: DeviceKind.NIC,  # network controllers: Ethernet, InfiniBand
    0x0B: DeviceKind.ACCELERATOR,  # processors/co-processors (QAT)
    0x10: DeviceKind.ACCELERATOR,  # encryption controllers
    0x12: DeviceKind.ACCELERATOR,  # processing accelerators
}


def kind_of_class(class_code: int) -> DeviceKind | None:
    """The device kind a PCI class code offers to tenants, if any."""
    return _KIND_BY_BASE_CLASS.get(class_code >> 16)


#: Named reasons of :meth:`HostView.handover_blocker`.
HANDOVER_IN_USE_BY_HOST = "in-use-by-host"
HANDOVER_GROUP_HOLDS_HOST_DEVICE = "group-holds-host-device"


@dataclass(frozen=True)
class PciFunctionView:
    """One PCI function."""

    address: PciAddress
    vendor_id: int
    device_id: int
    class_code: int
    driver: str | None
    numa_node: int
    iommu_group: IommuGroupNumber | None
    role: PciRole
    root_bus: str
    bridge_chain: tuple[PciAddress, ...]
    physfn: PciAddress | None = None
    model: str | None = None
    num_vfs: int = 0
    host_use: str | None = None
    migration_driver: str | None = None

    @cached_property
    def kind(self) -> DeviceKind | None:
        """Device kind by class code; None for anything not offered to tenants.

        Worked out once: the hot paths ask it of every device of a host.
        """
        return None if self.role.is_bridge else kind_of_class(self.class_code)

    @property
    def is_vf(self) -> bool:
        """An SR-IOV virtual function."""
        return self.physfn is not None

    @cached_property
    def root_port(self) -> PciAddress | None:
        """The root port above this function (first bridge of the chain)."""
        return self.bridge_chain[0] if self.bridge_chain else None

    @cached_property
    def switch(self) -> PciAddress | None:
        """The nearest switch upstream port above this function, if any.

        Bridge chains alternate root port, upstream, downstream, ...; the
        upstream port identifies the switch.
        """
        chain = self.bridge_chain
        # Index 1 is the first switch's upstream port; deeper switches sit at
        # odd indexes too. The nearest one is the last odd index.
        odd = [chain[i] for i in range(1, len(chain), 2)]
        return odd[-1] if odd else None

    @cached_property
    def switches(self) -> tuple[PciAddress, ...]:
        """Every switch above this function, by upstream port, outermost first.

        HGX boards nest switches (a GPU two levels down, its NIC one level
        down the same outer switch): two devices are "under one switch"
        (nvidia-smi PIX/PXB) when they share any of these.
        """
        chain = self.bridge_chain
        return tuple(chain[i] for i in range(1, len(chain), 2))

    @cached_property
    def own_domains(self) -> tuple[tuple[ExclusivityDomain, str], ...]:
        """The device, PCIe switch and NUMA node domains it lies in, narrowest first.

        Every exclusivity domain but the host's, which is the host's name
        (see :func:`domain_instance`): fixed per function, so worked out once.
        """
        outermost = self.switches[0] if self.switches else None
        return (
            (ExclusivityDomain.DEVICE, self.address),
            (
                ExclusivityDomain.PCIE_SWITCH,
                outermost or self.root_port or self.root_bus or self.address,
            ),
            (ExclusivityDomain.NUMA_NODE, str(self.numa_node)),
        )


@dataclass(frozen=True)
class IommuGroupView:
    """One IOMMU group and who is in it."""

    number: IommuGroupNumber
    members: tuple[PciAddress, ...]


@dataclass(frozen=True)
class NumaNodeView:
    """One NUMA node.

    Attributes:
        node_id: N of nodeN.
        distances: SLIT distance to every node, in node-id order.
        cpus: how many CPUs it has (0: not reported).
        memory_mib: its memory in MiB (0: not reported).
    """

    node_id: int
    distances: tuple[int, ...]
    cpus: int = 0
    memory_mib: int = 0


@dataclass(frozen=True)
class VfView:
    """One existing VF of an SR-IOV PF."""

    index: int
    address: PciAddress
    iommu_group: IommuGroupNumber | None


@dataclass(frozen=True)
class SriovPfView:
    """An SR-IOV physical function and its VFs.

    Attributes:
        address: the PF.
        total_vfs: sriov_totalvfs: the most VFs it can have.
        num_vfs: sriov_numvfs: VFs enabled now.
        vfs: the enabled VFs, by index.
        vf_migration_driver: the migration-capable VFIO variant driver a VF
            not created yet would bind to, None when its VFs cannot migrate.
            An existing VF's own ``migration_driver`` is what counts for it.
    """

    address: PciAddress
    total_vfs: int
    num_vfs: int
    vfs: tuple[VfView, ...] = ()
    vf_migration_driver: str | None = None


@dataclass(frozen=True)
class MdevTypeView:
    """One mdev type a parent offers.

    Attributes:
        type_id: "nvidia-63".
        available: available_instances as the kernel reported it.
        max_instances: instances of this type an empty parent holds (the
            vendor's ``max_instance=`` when its description says, else what
            is available plus what lives now).
        migratable: the vendor marks the type live-migratable.
    """

    type_id: str
    available: int
    max_instances: int
    migratable: bool = False


@dataclass(frozen=True)
class MdevParentView:
    """A device offering mdev types.

    Attributes:
        address: the parent (a GPU).
        types: offered types by id.
        live: the mdevs that exist now: uuid -> type id.
        single_type: every live mdev must share one type (time-sliced vGPU
            before Ampere).
    """

    address: PciAddress
    types: Mapping[str, MdevTypeView]
    live: Mapping[str, str] = field(default_factory=dict)
    single_type: bool = False


@dataclass(frozen=True)
class GpuView:
    """What NVML says of a GPU, as far as placement needs it.

    Attributes:
        address: the GPU's PCI function.
        model: "NVIDIA H100 80GB HBM3".
        mig_enabled: MIG mode is on now (current, not pending).
        mig_profiles: GPU-instance profiles with their allowed placements.
        gpu_instances: the GPU instances that exist now.
    """

    address: PciAddress
    model: str
    mig_enabled: bool = False
    mig_profiles: tuple[MigProfile, ...] = ()
    gpu_instances: tuple[GpuInstance, ...] = ()


@dataclass(frozen=True)
class HostView:
    """Everything placement needs to know about one host."""

    host_id: HostId
    functions: Mapping[PciAddress, PciFunctionView]
    iommu_groups: Mapping[IommuGroupNumber, IommuGroupView]
    numa_nodes: tuple[NumaNodeView, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    iommu_present: bool = True
    sriov_pfs: Mapping[PciAddress, SriovPfView] = field(default_factory=dict)
    mdev_parents: Mapping[PciAddress, MdevParentView] = field(default_factory=dict)
    gpus: Mapping[PciAddress, GpuView] = field(default_factory=dict)

    @cached_property
    def hardware_class(self) -> int:
        """A fingerprint of everything but the host's name and labels.

        Hosts of one class (the same hardware in the same state: a fleet of
        identical servers) judge a request alike on an empty host, so the
        engine decides once per class what such a host can never take
        (Nomad's computed node class).
        """
        parents = tuple(
            (
                p.address,
                p.single_type,
                tuple(sorted(p.types.items())),
                tuple(sorted(p.live.items())),
            )
            for p in sorted(self.mdev_parents.values(), key=lambda p: p.address)
        )
        return hash(
            (
                tuple(sorted(self.functions.items())),
                tuple(sorted(self.iommu_groups.items())),
                self.numa_nodes,
                self.iommu_present,
                tuple(sorted(self.sriov_pfs.items())),
                parents,
                tuple(sorted(self.gpus.items())),
            )
        )

    @cached_property
    def _whole_devices(self) -> Mapping[DeviceKind, tuple[PciFunctionView, ...]]:
        index: dict[DeviceKind, list[PciFunctionView]] = {}
        for f in self.functions.values():
            kind = f.kind
            if kind is not None and not f.is_vf:
                index.setdefault(kind, []).append(f)
        return {k: tuple(v) for k, v in index.items()}

    @cached_property
    def cpu_milli(self) -> int:
        """Host CPU placements may hold, in thousandths of a CPU: every CPU reported."""
        return 1000 * sum(n.cpus for n in self.numa_nodes)

    @cached_property
    def memory_mib(self) -> int:
        """Host memory placements may hold, in MiB: every node's reported."""
        return sum(n.memory_mib for n in self.numa_nodes)

    @cached_property
    def functions_of_kind(self) -> Mapping[DeviceKind, int]:
        """How many functions of each kind the host has, VFs included."""
        return Counter(k for f in self.functions.values() if (k := f.kind) is not None)

    def whole_devices(self, kind: DeviceKind) -> tuple[PciFunctionView, ...]:
        """Devices of a kind that can be handed over whole (no VFs, no bridges).

        Indexed once per view: views are immutable and shared across
        scheduling passes, so the hot path never scans every function.
        """
        return self._whole_devices.get(kind, ())

    @cached_property
    def _group_endpoints(self) -> Mapping[IommuGroupNumber, tuple[PciAddress, ...]]:
        return {
            number: tuple(
                sorted(
                    a
                    for a in group.members
                    if a in self.functions and not self.functions[a].role.is_bridge
                )
            )
            for number, group in self.iommu_groups.items()
        }

    def group_endpoints(self, group: IommuGroupNumber) -> tuple[PciAddress, ...]:
        """Members of a group that are not bridges: what passthrough binds.

        Indexed once per (immutable) view, like :meth:`whole_devices`.
        """
        return self._group_endpoints.get(group, ())

    @cached_property
    def _handover_blockers(self) -> Mapping[PciAddress, tuple[str, str]]:
        blockers: dict[PciAddress, tuple[str, str]] = {}
        for devices in self._whole_devices.values():
            for device in devices:
                blocker = self._handover_blocker(device)
                if blocker is not None:
                    blockers[device.address] = blocker
        return blockers

    def _handover_blocker(self, device: PciFunctionView) -> tuple[str, str] | None:
        if device.iommu_group is None:
            return None
        endpoints = self.group_endpoints(device.iommu_group)
        for e in endpoints:
            use = self.functions[e].host_use
            if use:
                # The agent reports what the host itself needs (its boot
                # display, a NIC whose link is up); it refuses to hand it over.
                return HANDOVER_IN_USE_BY_HOST, f"{e}: {use}"
        slot = device.address.rsplit(".", 1)[0]
        for e in endpoints:
            # Passthrough takes every endpoint of the group. Another offered
            # device may go along, and so may the device's own companion
            # functions in its slot (a GPU's HDMI audio); anything else
            # (storage, USB, SMBus) belongs to the host.
            foreign = self.functions[e].kind is None and e.rsplit(".", 1)[0] != slot
            if e != device.address and foreign:
                return (
                    HANDOVER_GROUP_HOLDS_HOST_DEVICE,
                    f"{device.address} shares IOMMU group {device.iommu_group} with {e}",
                )
        return None

    def handover_blocker(self, address: PciAddress) -> tuple[str, str] | None:
        """Why a whole device cannot be handed to a tenant: (reason, detail), or None.

        Computed once per (immutable) view.
        """
        return self._handover_blockers.get(address)

    def socket_of(self, numa_node: int) -> int:
        """Socket index of a NUMA node.

        Sockets are not in sysfs; nodes of one socket are those at the
        smallest non-local SLIT distance from each other (12 vs 32 on EPYC
        NPS4, 21 between Intel sockets), so group nodes by that relation.
        """
        nodes = {n.node_id: n for n in self.numa_nodes}
        if numa_node not in nodes or len(nodes) < 2:
            return 0
        ids = sorted(nodes)
        all_remote = [
            d for n in nodes.values() for i, d in enumerate(n.distances) if ids[i] != n.node_id
        ]
        if not all_remote:
            return 0
        far = max(all_remote)
        socket = 0
        seen: dict[int, int] = {}
        for node_id in ids:
            if node_id in seen:
                continue
            for i, other in enumerate(ids):
                dist = nodes[node_id].distances[i] if i < len(nodes[node_id].distances) else far
                if other == node_id or dist < far:
                    seen.setdefault(other, socket)
            socket += 1
        return seen.get(numa_node, 0)


def domain_instance(view: HostView, device: PciFunctionView, domain: ExclusivityDomain) -> str:
    """The instance of ``domain`` that ``device`` belongs to.

    The switch domain is the outermost switch: nested switch levels share
    its upstream link, so that is the blast radius. A device under no switch
    belongs to its root port's "switch" domain (or its root bus's when it has
    no port): the nearest shared PCIe element.
    """
    if domain is ExclusivityDomain.HOST:
        return view.host_id
    return next(instance for d, instance in device.own_domains if d is domain)
