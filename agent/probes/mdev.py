"""Mediated devices (``drivers/vfio/mdev/mdev_sysfs.c``, HW_FACTS §7).

Parents are the entries of ``/sys/class/mdev_bus`` (links to the parent
device). Each offers types under ``mdev_supported_types/<type-id>/``, where the
id is ``<parent driver>-<vendor type name>`` (``nvidia-63``); live mdevs are
``<parent>/<uuid>/`` with an ``mdev_type`` link and a single-device IOMMU
group of their own.

**single_type rule.** NVIDIA time-sliced vGPU runs every vGPU of one physical
GPU with the same type: once one ``nvidia-*`` mdev exists, the other types
show ``available_instances`` 0 (pre-Ampere, e.g. Tesla P4; HW_FACTS §7). A
parent is marked single-type when its vendor is NVIDIA (0x10de) and every type
it offers is an ``nvidia-*`` type. On SR-IOV GPUs (Ampere and later) the
parents are VFs holding one vGPU each, for which the flag holds trivially.
Other vendors (Intel GVT-g, mtty) mix types freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NewType

from tessera.agent.probes.iommu import IommuGroupNumber
from tessera.agent.probes.pci import PciAddress, PciFunction
from tessera.agent.sysfs import Sysfs

MdevUuid = NewType("MdevUuid", str)

_NVIDIA_VENDOR = 0x10DE
_NVIDIA_TYPE_PREFIX = "nvidia-"


@dataclass(frozen=True)
class MdevType:
    """One type a parent offers.

    Attributes:
        type_id: ``nvidia-63``.
        name: ``GRID P4-1Q``; the type id when the driver gives no name.
        description: vendor text; None when the driver provides none.
        available_instances: how many more can be created now.
        device_api: ``vfio-pci``, ...
        instances: UUIDs of the live mdevs of this type.
    """

    type_id: str
    name: str
    description: str | None
    available_instances: int
    device_api: str
    instances: tuple[MdevUuid, ...]


@dataclass(frozen=True)
class MdevInstance:
    """A live mediated device.

    Attributes:
        uuid: its UUID.
        type_id: the type it was created as.
        iommu_group: its own IOMMU group, None if the link is missing.
        driver: the mdev driver bound to it, None when unbound.
    """

    uuid: MdevUuid
    type_id: str
    iommu_group: IommuGroupNumber | None
    driver: str | None


@dataclass(frozen=True)
class MdevParent:
    """A device that offers mdev types.

    Attributes:
        address: the parent's device name: a PCI address for GPUs, the
            device name for virtual parents (``mtty``).
        types: offered types, by id.
        instances: live mdevs on this parent, by UUID.
        single_type: all live mdevs must share one type (see module doc).
    """

    address: str
    types: tuple[MdevType, ...]
    instances: tuple[MdevInstance, ...]
    single_type: bool


def _count(text: str | None) -> int:
    try:
        return int(text.strip()) if text is not None else 0
    except ValueError:
        return 0


def probe_mdev(
    sysfs: Sysfs, functions: Mapping[PciAddress, PciFunction]
) -> tuple[MdevParent, ...] | None:
    """Every mdev parent; None when the kernel has no mdev bus class.

    Args:
        sysfs: the host's sysfs.
        functions: the host's PCI functions, by address (parent vendors).
    """
    bus = sysfs.path("class", "mdev_bus")
    if not sysfs.exists(bus):
        return None
    parents = []
    for name in sysfs.listdir(bus):
        parent = sysfs.resolve(bus / name)
        types = []
        instances = []
        supported = parent / "mdev_supported_types"
        for type_id in sysfs.listdir(supported):
            directory = supported / type_id
            uuids = tuple(MdevUuid(u) for u in sysfs.listdir(directory / "devices"))
            types.append(
                MdevType(
                    type_id=type_id,
                    name=sysfs.read(directory / "name") or type_id,
                    description=sysfs.read(directory / "description"),
                    available_instances=_count(sysfs.read(directory / "available_instances")),
                    device_api=sysfs.read(directory / "device_api") or "",
                    instances=uuids,
                )
            )
            for uuid in uuids:
                mdev = parent / uuid
                group = sysfs.link_name(mdev / "iommu_group")
                instances.append(
                    MdevInstance(
                        uuid=uuid,
                        type_id=type_id,
                        iommu_group=(
                            IommuGroupNumber(int(group))
                            if group is not None and group.isdigit()
                            else None
                        ),
                        driver=sysfs.link_name(mdev / "driver"),
                    )
                )
        function = functions.get(PciAddress(name))
        single_type = (
            function is not None
            and function.vendor_id == _NVIDIA_VENDOR
            and bool(types)
            and all(t.type_id.startswith(_NVIDIA_TYPE_PREFIX) for t in types)
        )
        parents.append(
            MdevParent(
                address=name,
                types=tuple(types),
                instances=tuple(sorted(instances, key=lambda i: i.uuid)),
                single_type=single_type,
            )
        )
    return tuple(parents)
