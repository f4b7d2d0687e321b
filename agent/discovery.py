"""Discovery: every probe of the host, assembled into one :class:`HostReport`.

Pure domain: the report is frozen dataclasses, turned into the wire form only
by :mod:`agent.report`. Discovery never fails because a subsystem is missing
(no IOMMU, no mdev bus, no NUMA directory, no NVIDIA driver) or unreadable: it
records a note saying what was not reported and why, and reports the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tessera.agent.allowlist import AllowList
from tessera.agent.nvml import (
    GpuInstance,
    GpuInstanceProfile,
    MigMode,
    MigModeState,
    NullNvmlClient,
    NvmlClient,
    NvmlError,
    sysfs_address,
)
from tessera.agent.probes.host_use import host_use
from tessera.agent.probes.iommu import IommuGroupNumber, IommuTopology, probe_iommu
from tessera.agent.probes.mdev import MdevParent, probe_mdev
from tessera.agent.probes.migration import Migratability, migratability
from tessera.agent.probes.numa import NumaNode, probe_numa
from tessera.agent.probes.pci import PciAddress, PciFunction, probe_pci
from tessera.agent.probes.pcie import Locality, PcieTree, probe_tree
from tessera.agent.probes.sriov import SriovPf, probe_sriov
from tessera.agent.probes.vfio import VfioState, probe_vfio
from tessera.agent.sysfs import Sysfs

_T = TypeVar("_T")


@dataclass(frozen=True)
class MigUnsupported:
    """The GPU cannot do MIG."""


@dataclass(frozen=True)
class MigCapable:
    """A MIG-capable GPU.

    Attributes:
        mode: current and pending MIG mode.
        profiles: the GPU-instance profiles it supports.
        instances: the GPU instances that exist now (none unless enabled).
    """

    mode: MigModeState
    profiles: tuple[GpuInstanceProfile, ...]
    instances: tuple[GpuInstance, ...]


MigSupport = MigUnsupported | MigCapable


@dataclass(frozen=True)
class Gpu:
    """A GPU as NVML reports it.

    Attributes:
        address: its PCI address in sysfs form.
        uuid: ``GPU-...``.
        model: ``NVIDIA A100 80GB PCIe``.
        memory_mib: framebuffer memory.
        mig: what it can do with MIG.
    """

    address: PciAddress
    uuid: str
    model: str
    memory_mib: int
    mig: MigSupport


@dataclass(frozen=True)
class HostReport:
    """Everything discovery found on a host.

    Attributes:
        host_id: the name the agent registers under.
        boot_id: the kernel's boot id.
        labels: operator labels.
        functions: every PCI function, by address, in address order.
        tree: roles, root buses and bridge chains, with locality.
        iommu: IOMMU groups.
        numa_nodes: online NUMA nodes; empty when the kernel shows none.
        sriov_pfs: SR-IOV physical functions.
        mdev_parents: devices offering mdev types.
        vfio: VFIO-bound functions and the group char devs that exist.
        migratability: per function, its VFIO live-migration status.
        host_use: functions the host itself uses, with why (never handed over).
        gpus: GPUs NVML manages.
        notes: subsystems not (fully) reported, and why.
    """

    host_id: str
    boot_id: str
    labels: Mapping[str, str]
    functions: Mapping[PciAddress, PciFunction]
    tree: PcieTree
    iommu: IommuTopology
    numa_nodes: tuple[NumaNode, ...]
    sriov_pfs: tuple[SriovPf, ...]
    mdev_parents: tuple[MdevParent, ...]
    vfio: VfioState
    migratability: Mapping[PciAddress, Migratability]
    host_use: Mapping[PciAddress, str]
    gpus: tuple[Gpu, ...]
    notes: tuple[str, ...]

    def group_of(self, address: PciAddress) -> IommuGroupNumber | None:
        """The IOMMU group of a function, None without one."""
        return self.iommu.group_of(address)

    def endpoints_of(self, group: IommuGroupNumber) -> tuple[PciAddress, ...]:
        """What passthrough of ``group`` binds: its members that are not bridges."""
        return self.iommu.endpoints_of(group)

    def locality(self, a: PciAddress, b: PciAddress) -> Locality:
        """NVML topology level between two functions (PIX ... SYS).

        Raises:
            KeyError: either is not a PCI function of this host.
        """
        return self.tree.locality(a, b)


def _guarded(notes: list[str], subsystem: str, probe: Callable[[], _T], default: _T) -> _T:
    """Run a probe; an OS error (permissions, a device vanishing) becomes a note."""
    try:
        return probe()
    except OSError as err:
        notes.append(f"{subsystem}: unreadable ({err})")
        return default


def _mig(nvml: NvmlClient, uuid: str, notes: list[str]) -> MigSupport:
    """A GPU's MIG state; an NVML failure part way leaves what was read."""
    try:
        mode = nvml.mig_mode(uuid)
    except NvmlError as err:
        notes.append(f"nvml: GPU {uuid}: MIG mode: {err}")
        return MigUnsupported()
    if mode is None:
        return MigUnsupported()
    profiles: tuple[GpuInstanceProfile, ...] = ()
    instances: tuple[GpuInstance, ...] = ()
    try:
        profiles = tuple(nvml.gpu_instance_profiles(uuid))
        # Instances exist only while MIG is on; a disabled GPU need not answer.
        if mode.current is MigMode.ENABLED:
            instances = tuple(nvml.gpu_instances(uuid))
    except NvmlError as err:
        notes.append(f"nvml: GPU {uuid}: MIG profiles or instances: {err}")
    return MigCapable(mode=mode, profiles=profiles, instances=instances)


def _gpus(
    nvml: NvmlClient, functions: Mapping[PciAddress, PciFunction], notes: list[str]
) -> tuple[Gpu, ...]:
    try:
        if nvml.driver_version() is None:
            why = (
                nvml.reason
                if isinstance(nvml, NullNvmlClient) and nvml.reason
                else "no NVIDIA driver loaded"
            )
            notes.append(f"nvml: {why}; GPU models and MIG are not reported")
            return ()
        listed = tuple(nvml.gpus())
    except NvmlError as err:
        notes.append(f"nvml: unavailable ({err}); GPU models and MIG are not reported")
        return ()
    out = []
    for gpu in listed:
        try:
            address = PciAddress(sysfs_address(gpu.pci_bus_id))
        except ValueError:
            notes.append(f"nvml: GPU {gpu.uuid}: unusable PCI bus id {gpu.pci_bus_id!r}")
            continue
        if address not in functions:
            notes.append(f"nvml: GPU {gpu.uuid} at {address} is not a PCI function in sysfs")
        out.append(
            Gpu(
                address=address,
                uuid=gpu.uuid,
                model=gpu.name,
                memory_mib=gpu.memory_mib,
                mig=_mig(nvml, gpu.uuid, notes),
            )
        )
    return tuple(sorted(out, key=lambda g: g.address))


def discover(
    sysfs: Sysfs,
    nvml: NvmlClient,
    *,
    host_id: str,
    boot_id: str,
    labels: Mapping[str, str],
    allow: AllowList | None = None,
) -> HostReport:
    """Probe the host.

    Args:
        sysfs: the host's sysfs and /dev (real or a fake tree).
        nvml: NVML, or :class:`agent.nvml.NullNvmlClient` without a driver.
        host_id: the name the agent registers under.
        boot_id: the kernel's boot id.
        labels: operator labels.
        allow: the operator's allow-list; functions outside it are reported
            in ``host_use``. None: no restriction (the default list allows
            every function the scheduler offers).

    Returns:
        The report; absent or unreadable subsystems are in its ``notes``.
    """
    notes: list[str] = []

    if not sysfs.exists(sysfs.path("bus", "pci", "devices")):
        notes.append("pci: /sys/bus/pci/devices absent; no PCI functions reported")
    no_functions: tuple[PciFunction, ...] = ()
    functions = {
        f.address: f for f in _guarded(notes, "pci", lambda: probe_pci(sysfs), no_functions)
    }
    tree = _guarded(
        notes, "pcie", lambda: probe_tree(sysfs, functions.values()), PcieTree(positions={})
    )

    iommu = _guarded(
        notes,
        "iommu",
        lambda: probe_iommu(sysfs, functions.values()),
        IommuTopology(present=False, groups={}, by_address={}),
    )
    if not iommu.groups:
        notes.append("iommu: no IOMMU groups (IOMMU off or absent); passthrough is impossible")
    elif not iommu.present:
        notes.append("iommu: only VFIO no-IOMMU groups; devices are not isolated")

    numa = _guarded(notes, "numa", lambda: probe_numa(sysfs), None)
    if numa is None:
        notes.append("numa: /sys/devices/system/node absent; no NUMA nodes reported")

    no_pfs: tuple[SriovPf, ...] = ()
    sriov = _guarded(
        notes, "sriov", lambda: probe_sriov(sysfs, functions.values(), iommu.by_address), no_pfs
    )

    mdev = _guarded(notes, "mdev", lambda: probe_mdev(sysfs, functions), None)
    if mdev is None:
        notes.append("mdev: no mdev bus (/sys/class/mdev_bus absent); no mdev parents")

    noiommu = frozenset(n for n, g in iommu.groups.items() if g.noiommu)
    vfio = _guarded(
        notes,
        "vfio",
        lambda: probe_vfio(sysfs, functions.values(), iommu.by_address, noiommu),
        VfioState(bindings={}, group_nodes={}, missing_nodes=()),
    )
    notes.extend(
        f"vfio: group {g} has a VFIO-bound member but no /dev/vfio node" for g in vfio.missing_nodes
    )

    gpus = _gpus(nvml, functions, notes)

    in_use = {a: why for a in functions if (why := host_use(sysfs, a)) is not None}
    if allow is not None:
        # The host's own use is the stronger reason; keep it when both apply.
        in_use = {**allow.refusals(functions), **in_use}

    return HostReport(
        host_id=host_id,
        boot_id=boot_id,
        labels=dict(labels),
        functions=functions,
        tree=tree,
        iommu=iommu,
        numa_nodes=numa or (),
        sriov_pfs=sriov,
        mdev_parents=mdev or (),
        vfio=vfio,
        migratability={a: migratability(f) for a, f in functions.items()},
        host_use=dict(sorted(in_use.items())),
        gpus=gpus,
        notes=tuple(notes),
    )
