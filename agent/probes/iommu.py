"""IOMMU groups: ``/sys/kernel/iommu_groups/<N>/`` (HW_FACTS §5).

A group is the unit of isolation: passthrough hands a whole group to one
tenant, and userspace can own it only while every endpoint in it is unbound
or on a driver that leaves DMA ownership to VFIO (``driver_managed_dma``:
vfio-pci and its variants, pci-stub; pcieport on the bridges), as
``VFIO_GROUP_GET_STATUS`` reports ``VIABLE`` (HW_FACTS §2, §6).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NewType

from tessera.agent.probes.pci import PciAddress, PciFunction, is_pci_address
from tessera.agent.probes.vfio import is_dma_safe_driver
from tessera.agent.sysfs import Sysfs

IommuGroupNumber = NewType("IommuGroupNumber", int)

#: The ``name`` the kernel gives groups VFIO fakes in no-IOMMU mode: no
#: isolation at all, and the char dev is ``/dev/vfio/noiommu-<N>``.
NOIOMMU_GROUP_NAME = "vfio-noiommu"

#: The driver PCIe ports are bound to; it lets userspace own the group.
_PORT_DRIVER = "pcieport"


class IommuDomainType(enum.Enum):
    """The group's default domain type, as ``type`` reads."""

    DMA = "DMA"
    DMA_FQ = "DMA-FQ"
    IDENTITY = "identity"
    BLOCKED = "blocked"
    UNMANAGED = "unmanaged"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class IommuGroup:
    """One IOMMU group.

    Attributes:
        number: N of ``iommu_groups/N``.
        members: PCI functions in the group, bridges included, sorted.
        endpoints: members that are not bridges: what passthrough binds.
        mdev_members: mediated devices (UUIDs) in the group; an mdev gets a
            group of its own, so these groups have no PCI members.
        domain_type: the default domain type; None when ``type`` is absent
            or unrecognised.
        name: the group's ``name`` (only ``vfio-noiommu`` groups have one).
        viable: every endpoint is unbound or on a DMA-safe driver, and every
            bridge is unbound or on pcieport or a DMA-safe driver.
    """

    number: IommuGroupNumber
    members: tuple[PciAddress, ...]
    endpoints: tuple[PciAddress, ...]
    mdev_members: tuple[str, ...]
    domain_type: IommuDomainType | None
    name: str | None
    viable: bool

    @property
    def noiommu(self) -> bool:
        """A VFIO no-IOMMU group: it isolates nothing."""
        return self.name == NOIOMMU_GROUP_NAME


@dataclass(frozen=True)
class IommuTopology:
    """Every IOMMU group of the host.

    Attributes:
        present: the kernel isolates devices with an IOMMU: at least one group
            exists that is not a VFIO no-IOMMU group.
        groups: by number.
        by_address: the group of every PCI function that has one.
    """

    present: bool
    groups: Mapping[IommuGroupNumber, IommuGroup]
    by_address: Mapping[PciAddress, IommuGroupNumber]

    def group_of(self, address: PciAddress) -> IommuGroupNumber | None:
        """The group holding a PCI function, None if it has none."""
        return self.by_address.get(address)

    def endpoints_of(self, group: IommuGroupNumber) -> tuple[PciAddress, ...]:
        """The members of a group that are not bridges; empty if no such group.

        These are what passthrough must bind together: the device asked for
        and every other endpoint that cannot be isolated from it.
        """
        found = self.groups.get(group)
        return found.endpoints if found is not None else ()


def _viable(members: Iterable[PciFunction]) -> bool:
    for function in members:
        if function.driver is None or is_dma_safe_driver(function.driver):
            continue
        if function.is_bridge and function.driver == _PORT_DRIVER:
            continue
        return False
    return True


def _domain_type(text: str | None) -> IommuDomainType | None:
    if text is None:
        return None
    try:
        return IommuDomainType(text.strip())
    except ValueError:
        return None


def probe_iommu(sysfs: Sysfs, functions: Iterable[PciFunction]) -> IommuTopology:
    """Read ``/sys/kernel/iommu_groups``.

    Args:
        sysfs: the host's sysfs.
        functions: the host's PCI functions, for drivers and bridge classes.
    """
    by_address = {f.address: f for f in functions}
    root = sysfs.path("kernel", "iommu_groups")
    groups: dict[IommuGroupNumber, IommuGroup] = {}
    for entry in sysfs.listdir(root):
        if not entry.isdigit():
            continue
        number = IommuGroupNumber(int(entry))
        names = sysfs.listdir(root / entry / "devices")
        members = tuple(PciAddress(n) for n in names if is_pci_address(n))
        known = [by_address[m] for m in members if m in by_address]
        groups[number] = IommuGroup(
            number=number,
            members=members,
            endpoints=tuple(
                m for m in members if m not in by_address or not by_address[m].is_bridge
            ),
            mdev_members=tuple(n for n in names if not is_pci_address(n)),
            domain_type=_domain_type(sysfs.read(root / entry / "type")),
            name=sysfs.read(root / entry / "name"),
            viable=_viable(known),
        )
    ordered = dict(sorted(groups.items()))
    present = any(not g.noiommu for g in ordered.values())
    group_of = {m: g.number for g in ordered.values() for m in g.members}
    return IommuTopology(present=present, groups=ordered, by_address=group_of)
