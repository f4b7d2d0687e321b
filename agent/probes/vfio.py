"""VFIO bindings and their device nodes (HW_FACTS §2, §6).

A function is "on VFIO" when its ``driver`` link names ``vfio-pci`` (with a
dash) or a variant driver (``mlx5_vfio_pci``, ``qat_vfio_pci``, ...; module
names end in ``_vfio_pci``, though a few older kernels registered them with
dashes, ``hisi-acc-vfio-pci``). Once any member of a group is on VFIO, the
group's char dev ``/dev/vfio/<N>`` exists (``noiommu-<N>`` in no-IOMMU mode).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessera.agent.probes.pci import PciAddress, PciFunction
from tessera.agent.sysfs import Sysfs

if TYPE_CHECKING:
    # Only for annotations: agent.probes.iommu imports this module.
    from tessera.agent.probes.iommu import IommuGroupNumber

#: The plain VFIO PCI driver's name: a dash, unlike the variant drivers.
VFIO_PCI = "vfio-pci"

#: The stub driver: claims a device without touching it, DMA-safe.
PCI_STUB = "pci-stub"

_VARIANT_SUFFIX = "_vfio_pci"


def normalize_driver_name(driver: str) -> str:
    """A driver name with dashes as underscores, for comparing variants.

    Some kernels registered variant drivers with dashes; the module name
    always has underscores.
    """
    return driver.replace("-", "_")


def is_vfio_driver(driver: str | None) -> bool:
    """Whether ``driver`` is vfio-pci or a VFIO PCI variant driver."""
    if driver is None:
        return False
    return driver == VFIO_PCI or normalize_driver_name(driver).endswith(_VARIANT_SUFFIX)


def is_dma_safe_driver(driver: str) -> bool:
    """A driver that leaves the group's DMA ownership to userspace.

    vfio-pci, its variants and pci-stub set ``driver_managed_dma``; every
    other endpoint driver makes the group unusable for VFIO (EPERM on claim).
    """
    return driver == PCI_STUB or is_vfio_driver(driver)


def group_node(group: int, *, noiommu: bool = False) -> str:
    """The host path of a group's VFIO char dev: ``/dev/vfio/<N>``."""
    return f"/dev/vfio/noiommu-{group}" if noiommu else f"/dev/vfio/{group}"


@dataclass(frozen=True)
class VfioBinding:
    """A function bound to a VFIO driver.

    Attributes:
        address: the function.
        driver: ``vfio-pci`` or the variant driver.
        group: its IOMMU group, None without one (no-IOMMU without a group
            cannot bind; kept for completeness).
        group_node: ``/dev/vfio/<N>`` (host path) when it exists under the
            root's ``dev/``, else None.
        device_cdev: ``/dev/vfio/devices/vfioX`` when the kernel has VFIO
            device cdevs (``vfio-dev/vfioX`` in sysfs), else None.
    """

    address: PciAddress
    driver: str
    group: IommuGroupNumber | None
    group_node: str | None
    device_cdev: str | None


@dataclass(frozen=True)
class VfioState:
    """Every VFIO-bound function and the group nodes that exist.

    Attributes:
        bindings: by address.
        group_nodes: group number to its host char dev path, for every group
            with a VFIO-bound member whose node exists.
        missing_nodes: groups with a VFIO-bound member but no char dev under
            ``dev/vfio`` (the driver is still registering, or ``/dev`` is not
            the host's).
    """

    bindings: Mapping[PciAddress, VfioBinding]
    group_nodes: Mapping[IommuGroupNumber, str]
    missing_nodes: tuple[IommuGroupNumber, ...]


def probe_vfio(
    sysfs: Sysfs,
    functions: Iterable[PciFunction],
    group_of: Mapping[PciAddress, IommuGroupNumber],
    noiommu_groups: frozenset[IommuGroupNumber] = frozenset(),
) -> VfioState:
    """Find VFIO-bound functions and their device nodes.

    Args:
        sysfs: the host's sysfs and /dev.
        functions: the host's PCI functions.
        group_of: each function's IOMMU group.
        noiommu_groups: groups that are VFIO no-IOMMU groups.
    """
    bindings: dict[PciAddress, VfioBinding] = {}
    nodes: dict[IommuGroupNumber, str] = {}
    missing: set[IommuGroupNumber] = set()
    for function in functions:
        if function.driver is None or not is_vfio_driver(function.driver):
            continue
        group = group_of.get(function.address)
        node: str | None = None
        if group is not None:
            node = group_node(group, noiommu=group in noiommu_groups)
            if sysfs.exists(sysfs.dev / node.removeprefix("/dev/")):
                nodes[group] = node
            else:
                missing.add(group)
                node = None
        cdevs = sysfs.listdir(sysfs.path("bus", "pci", "devices", function.address, "vfio-dev"))
        bindings[function.address] = VfioBinding(
            address=function.address,
            driver=function.driver,
            group=group,
            group_node=node,
            device_cdev=f"/dev/vfio/devices/{cdevs[0]}" if cdevs else None,
        )
    return VfioState(
        bindings=bindings,
        group_nodes=dict(sorted(nodes.items())),
        missing_nodes=tuple(sorted(missing - set(nodes))),
    )
