"""Identity types of the scheduling domain."""

from __future__ import annotations

from typing import NewType

#: A host as its agent registers it.
HostId = NewType("HostId", str)
#: A PCI function address in sysfs form, "0000:4b:00.0".
PciAddress = NewType("PciAddress", str)
#: An IOMMU group number as /sys/kernel/iommu_groups/<N> names it.
IommuGroupNumber = NewType("IommuGroupNumber", int)
#: A placement, chosen by the scheduler.
PlacementId = NewType("PlacementId", str)
#: The client's idempotency key of a request.
RequestId = NewType("RequestId", str)
#: A tenant name.
TenantName = NewType("TenantName", str)
#: A unit of allocation on a host, e.g. "iommu-group:12".
SlotKey = NewType("SlotKey", str)


def iommu_group_slot(group: IommuGroupNumber) -> SlotKey:
    """Slot key of a whole IOMMU group: the unit of whole-device passthrough."""
    return SlotKey(f"iommu-group:{group}")


def vfio_group_path(group: IommuGroupNumber) -> str:
    """The VFIO group node a tenant opens for a group."""
    return f"/dev/vfio/{group}"
