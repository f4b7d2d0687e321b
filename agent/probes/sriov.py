"""SR-IOV physical functions and their VFs (``drivers/pci/iov.c``, HW_FACTS §3).

A PF is a function with ``sriov_totalvfs``. Its enabled VFs are the
``virtfn<i>`` links (``-> ../<VF address>``); VFs are siblings of the PF in
the tree and each normally has its own IOMMU group.

A PF also says what its VFs will be before any exists: ``sriov_vf_device`` is
the device id every VF of it reports (its vendor is the PF's), so the VFIO
variant driver a VF would migrate with is known while ``sriov_numvfs`` is 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tessera.agent.probes.iommu import IommuGroupNumber
from tessera.agent.probes.migration import migration_driver_for
from tessera.agent.probes.pci import PciAddress, PciFunction
from tessera.agent.sysfs import Sysfs

_VIRTFN = re.compile(r"^virtfn(\d+)$")


@dataclass(frozen=True)
class VirtualFunction:
    """One enabled VF.

    Attributes:
        index: i of the PF's ``virtfn<i>``.
        address: the VF's address.
        driver: its bound driver, None when unbound.
        iommu_group: its IOMMU group, None without an IOMMU.
    """

    index: int
    address: PciAddress
    driver: str | None
    iommu_group: IommuGroupNumber | None


@dataclass(frozen=True)
class SriovPf:
    """An SR-IOV physical function.

    Attributes:
        address: the PF.
        total_vfs: ``sriov_totalvfs``.
        num_vfs: ``sriov_numvfs``, the VFs enabled now.
        vf_offset: ``sriov_offset``, routing-id offset of VF 0.
        vf_stride: ``sriov_stride``.
        vf_device_id: ``sriov_vf_device`` (printed without ``0x``).
        drivers_autoprobe: ``sriov_drivers_autoprobe``: new VFs get a driver.
        vfs: the enabled VFs, by index.
        vf_migration_driver: the migration-capable VFIO variant driver for
            the PF's vendor and ``vf_device_id`` (see
            :mod:`agent.probes.migration`), None when none exists: what a VF
            created on Prepare binds to so that it can be live-migrated.
    """

    address: PciAddress
    total_vfs: int
    num_vfs: int
    vf_offset: int
    vf_stride: int
    vf_device_id: int
    drivers_autoprobe: bool
    vfs: tuple[VirtualFunction, ...]
    vf_migration_driver: str | None


def _int(text: str | None, base: int = 10) -> int:
    if text is None:
        return 0
    try:
        return int(text.strip(), base)
    except ValueError:
        return 0


def probe_sriov(
    sysfs: Sysfs,
    functions: Iterable[PciFunction],
    group_of: Mapping[PciAddress, IommuGroupNumber],
) -> tuple[SriovPf, ...]:
    """Every SR-IOV PF of the host, in address order.

    Args:
        sysfs: the host's sysfs.
        functions: the host's PCI functions (drivers of the VFs).
        group_of: each function's IOMMU group.
    """
    by_address = {f.address: f for f in functions}
    pfs = []
    for address in sorted(by_address):
        device = sysfs.path("bus", "pci", "devices", address)
        total = sysfs.read(device / "sriov_totalvfs")
        if total is None:
            continue
        vf_device_id = _int(sysfs.read(device / "sriov_vf_device"), 16)
        vfs = []
        for entry in sysfs.listdir(device):
            match = _VIRTFN.match(entry)
            if not match:
                continue
            target = sysfs.link_name(device / entry)
            if target is None:
                continue
            vf = PciAddress(target)
            known = by_address.get(vf)
            vfs.append(
                VirtualFunction(
                    index=int(match.group(1)),
                    address=vf,
                    driver=known.driver if known is not None else None,
                    iommu_group=group_of.get(vf),
                )
            )
        pfs.append(
            SriovPf(
                address=address,
                total_vfs=_int(total),
                num_vfs=_int(sysfs.read(device / "sriov_numvfs")),
                vf_offset=_int(sysfs.read(device / "sriov_offset")),
                vf_stride=_int(sysfs.read(device / "sriov_stride")),
                vf_device_id=vf_device_id,
                drivers_autoprobe=_int(sysfs.read(device / "sriov_drivers_autoprobe")) != 0,
                # virtfn10 sorts before virtfn2 as text: order by the index.
                vfs=tuple(sorted(vfs, key=lambda v: v.index)),
                # Linux gives a VF its PF's vendor id (pci_iov_add_virtfn;
                # the VF's own Vendor ID register reads 0xffff) and
                # sriov_vf_device as its device id. An unreadable
                # sriov_vf_device reads 0 here and matches no driver.
                vf_migration_driver=migration_driver_for(
                    by_address[address].vendor_id, vf_device_id
                ),
            )
        )
    return tuple(pfs)
