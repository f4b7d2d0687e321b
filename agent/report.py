"""The one conversion from a discovered host to the wire ``HostInventory``.

Unknown values stay unset (proto3 defaults), so the scheduler reads their
absence as "unknown", never as "no" (see ``inventory.proto``).
"""

from __future__ import annotations

from collections.abc import Mapping

from tessera.agent.discovery import Gpu, HostReport, MigCapable
from tessera.agent.nvml import MigMode, MigPlacement
from tessera.agent.probes.iommu import IommuDomainType, IommuGroup
from tessera.agent.probes.mdev import MdevParent
from tessera.agent.probes.pci import PciFunction
from tessera.agent.probes.pcie import PciRole
from tessera.agent.probes.sriov import SriovPf
from tessera.agent.probes.vfio import group_node
from tessera.v1 import inventory_pb2

_ROLES: Mapping[PciRole, inventory_pb2.PciRole.ValueType] = {
    PciRole.ENDPOINT: inventory_pb2.PCI_ROLE_ENDPOINT,
    PciRole.RCIEP: inventory_pb2.PCI_ROLE_RCIEP,
    PciRole.ROOT_PORT: inventory_pb2.PCI_ROLE_ROOT_PORT,
    PciRole.SWITCH_UPSTREAM: inventory_pb2.PCI_ROLE_SWITCH_UPSTREAM,
    PciRole.SWITCH_DOWNSTREAM: inventory_pb2.PCI_ROLE_SWITCH_DOWNSTREAM,
    PciRole.PCI_BRIDGE: inventory_pb2.PCI_ROLE_PCI_BRIDGE,
}

_GROUP_TYPES: Mapping[IommuDomainType, inventory_pb2.IommuGroupType.ValueType] = {
    IommuDomainType.DMA: inventory_pb2.IOMMU_GROUP_TYPE_DMA,
    IommuDomainType.DMA_FQ: inventory_pb2.IOMMU_GROUP_TYPE_DMA_FQ,
    IommuDomainType.IDENTITY: inventory_pb2.IOMMU_GROUP_TYPE_IDENTITY,
    IommuDomainType.BLOCKED: inventory_pb2.IOMMU_GROUP_TYPE_BLOCKED,
    IommuDomainType.UNMANAGED: inventory_pb2.IOMMU_GROUP_TYPE_UNMANAGED,
    IommuDomainType.UNKNOWN: inventory_pb2.IOMMU_GROUP_TYPE_UNKNOWN,
}

_MIG_MODES: Mapping[MigMode, inventory_pb2.MigMode.ValueType] = {
    MigMode.DISABLED: inventory_pb2.MIG_MODE_DISABLED,
    MigMode.ENABLED: inventory_pb2.MIG_MODE_ENABLED,
}


def _function(report: HostReport, f: PciFunction) -> inventory_pb2.PciFunction:
    msg = inventory_pb2.PciFunction(
        address=f.address,
        vendor_id=f.vendor_id,
        device_id=f.device_id,
        subsystem_vendor_id=f.subsystem_vendor_id,
        subsystem_device_id=f.subsystem_device_id,
        class_code=f.class_code,
        driver=f.driver or "",
        driver_override=f.driver_override or "",
        numa_node=f.numa_node,
        local_cpulist=f.local_cpulist or "",
        reset_methods=list(f.reset_methods),
        physfn=f.physfn or "",
        host_use=report.host_use.get(f.address, ""),
    )
    group = report.iommu.group_of(f.address)
    if group is not None:
        msg.iommu_group = group
        msg.has_iommu_group = True
    position = report.tree.position(f.address)
    if position is not None:
        msg.bridge_chain.extend(position.bridge_chain)
        msg.root_bus = position.root_bus
        msg.role = _ROLES[position.role]
    if f.link is not None:
        msg.link.CopyFrom(
            inventory_pb2.PcieLink(
                current_speed=f.link.current_speed,
                current_width=f.link.current_width,
                max_speed=f.link.max_speed,
                max_width=f.link.max_width,
            )
        )
    migration = report.migratability.get(f.address)
    if migration is not None:
        msg.migratability.CopyFrom(
            inventory_pb2.Migratability(
                current_binding_migratable=migration.current_binding_migratable,
                migration_driver=migration.migration_driver or "",
            )
        )
    return msg


def _group(report: HostReport, group: IommuGroup) -> inventory_pb2.IommuGroup:
    msg = inventory_pb2.IommuGroup(
        number=group.number,
        members=list(group.members),
        viable=group.viable,
    )
    if group.domain_type is not None:
        msg.type = _GROUP_TYPES[group.domain_type]
    node = report.vfio.group_nodes.get(group.number)
    if node is not None:
        msg.vfio_path = node
    elif group.number in report.vfio.missing_nodes:
        # A member is bound to VFIO, so the kernel has the node even if this
        # root's /dev does not show it (a container without the host's /dev).
        msg.vfio_path = group_node(group.number, noiommu=group.noiommu)
    return msg


def _sriov(pf: SriovPf) -> inventory_pb2.SriovPf:
    msg = inventory_pb2.SriovPf(
        address=pf.address,
        total_vfs=pf.total_vfs,
        num_vfs=pf.num_vfs,
        vf_offset=pf.vf_offset,
        vf_stride=pf.vf_stride,
        vf_device_id=pf.vf_device_id,
        drivers_autoprobe=pf.drivers_autoprobe,
        vf_migration_driver=pf.vf_migration_driver or "",
    )
    for vf in pf.vfs:
        vf_msg = msg.vfs.add(index=vf.index, address=vf.address, driver=vf.driver or "")
        if vf.iommu_group is not None:
            vf_msg.iommu_group = vf.iommu_group
            vf_msg.has_iommu_group = True
    return msg


def _mdev(parent: MdevParent) -> inventory_pb2.MdevParent:
    msg = inventory_pb2.MdevParent(address=parent.address, single_type=parent.single_type)
    for t in parent.types:
        # ``migratable`` stays unset: no sysfs file says whether a vendor
        # type migrates (HW_FACTS §10), and unset means "unknown".
        msg.types.add(
            id=t.type_id,
            name=t.name,
            description=t.description or "",
            available_instances=t.available_instances,
            device_api=t.device_api,
            instances=list(t.instances),
        )
    for i in parent.instances:
        instance = msg.instances.add(uuid=i.uuid, type_id=i.type_id)
        if i.iommu_group is not None:
            instance.iommu_group = i.iommu_group
    return msg


def _placement(p: MigPlacement) -> inventory_pb2.MigPlacement:
    return inventory_pb2.MigPlacement(start=p.start, size=p.size)


def _gpu(gpu: Gpu) -> inventory_pb2.Gpu:
    msg = inventory_pb2.Gpu(
        address=gpu.address, uuid=gpu.uuid, model=gpu.model, memory_mib=gpu.memory_mib
    )
    if not isinstance(gpu.mig, MigCapable):
        msg.mig_mode_current = inventory_pb2.MIG_MODE_UNSUPPORTED
        msg.mig_mode_pending = inventory_pb2.MIG_MODE_UNSUPPORTED
        return msg
    msg.mig_mode_current = _MIG_MODES[gpu.mig.mode.current]
    msg.mig_mode_pending = _MIG_MODES[gpu.mig.mode.pending]
    for profile in gpu.mig.profiles:
        msg.mig_profiles.add(
            name=profile.name,
            profile_id=profile.profile_id,
            memory_mib=profile.memory_mib,
            slice_count=profile.slice_count,
            multiprocessor_count=profile.multiprocessor_count,
            placements=[_placement(p) for p in profile.placements],
        )
    for gi in gpu.mig.instances:
        msg.gpu_instances.add(
            id=gi.gi_id,
            profile_id=gi.profile_id,
            placement=_placement(gi.placement),
            compute_instances=[
                inventory_pb2.MigComputeInstance(
                    id=ci.ci_id, profile_id=ci.profile_id, uuid=ci.uuid
                )
                for ci in gi.compute_instances
            ],
        )
    return msg


def to_inventory(report: HostReport, generation: int) -> inventory_pb2.HostInventory:
    """The wire form of a discovered host.

    Args:
        report: what discovery found.
        generation: the report's generation number.

    Returns:
        The inventory. Groups holding only mediated devices are left out of
        ``iommu_groups`` (whose members are PCI addresses); each mdev carries
        its group in ``MdevInstance.iommu_group``. ``Gpu.nvlink_peers`` stays
        empty: the NVML client does not report NVLink yet.
    """
    inventory = inventory_pb2.HostInventory(
        host_id=report.host_id,
        boot_id=report.boot_id,
        generation=generation,
        iommu_present=report.iommu.present,
        labels=dict(report.labels),
        notes=list(report.notes),
    )
    for node in report.numa_nodes:
        msg = inventory.numa_nodes.add(
            id=node.node_id, cpulist=node.cpulist, distances=list(node.distances)
        )
        if node.memory_kib is not None:
            msg.memory_kib = node.memory_kib
    inventory.pci_functions.extend(_function(report, f) for f in report.functions.values())
    inventory.iommu_groups.extend(
        _group(report, g) for g in report.iommu.groups.values() if g.members
    )
    inventory.sriov_pfs.extend(_sriov(pf) for pf in report.sriov_pfs)
    inventory.mdev_parents.extend(_mdev(p) for p in report.mdev_parents)
    inventory.gpus.extend(_gpu(g) for g in report.gpus)
    return inventory
