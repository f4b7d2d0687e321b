"""Live-migratability of VFIO-assigned functions (HW_FACTS §10).

Plain vfio-pci passthrough cannot be live-migrated: only a VFIO variant driver
implementing the migration uAPI v2 (``VFIO_DEVICE_FEATURE_MIGRATION``) can.
No sysfs file says "migratable", so the agent's rule is:

* the current binding is migratable iff the ``driver`` link names a known
  migration-capable variant driver;
* a function *could* be migrated if it is an SR-IOV VF and such a driver
  lists its vendor:device id. Every in-tree migration driver drives VFs (its
  state is saved and restored through the PF); virtio-net's id ``1af4:1041``
  is also what a plain, non-VF virtio NIC reports, which cannot migrate.
* a VF not created yet could be migrated if that driver lists its PF's
  vendor and ``sriov_vf_device`` (the ids Linux gives the VF): the SR-IOV
  probe reports it per PF, so the scheduler can place a migratable VF on a
  PF whose VFs the agent enables on Prepare.

The authoritative answer needs ``VFIO_DEVICE_FEATURE(PROBE, MIGRATION)`` on an
opened device fd (and, for mlx5, migration-capable firmware); that is left to
the VMM.

The table below encodes ``vfio_migration_drivers.json`` of the project's
hardware reference, with the id tables of the kernel's variant drivers:

* ``mlx5_vfio_pci``: ``drivers/vfio/pci/mlx5/main.c`` ``mlx5vf_pci_table`` is
  only ``15b3:101e`` (ConnectX mlx5Gen VF: CX-6 Dx, CX-7, BlueField); CX-5 VFs
  (``1018``) are not matched.
* ``qat_vfio_pci``: ``drivers/vfio/pci/qat/main.c``: QAT 4xxx-family VFs
  ``8086:4941/4943/4945``.
* ``hisi_acc_vfio_pci``: ``drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.c``:
  HiSilicon SEC/HPRE/ZIP VFs ``19e5:a256/a259/a251`` (ids from
  ``include/linux/pci_ids.h``).
* ``pds_vfio_pci``: ``drivers/vfio/pci/pds/pci_drv.c``: Pensando DSC Ethernet
  VF ``1dd8:1003``.
* ``virtio_vfio_pci``: ``drivers/vfio/pci/virtio/main.c``: virtio-net VF
  ``1af4:1041`` (migration needs IOMMU dirty tracking through iommufd).
* ``xe_vfio_pci``: Intel Xe graphics SR-IOV VFs; its id table is not encoded
  here, so it is recognised as a binding but never proposed.

``nvgrace_gpu_vfio_pci`` is a variant driver for assignment only, without
migration, and is deliberately absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tessera.agent.probes.pci import PciFunction
from tessera.agent.probes.vfio import normalize_driver_name


@dataclass(frozen=True)
class MigrationDriver:
    """A migration-capable VFIO variant driver.

    Attributes:
        name: the module name (underscores), as the ``driver`` link reads on
            current kernels.
        device_ids: ``(vendor, device)`` pairs of its id table; empty when not
            encoded.
    """

    name: str
    device_ids: frozenset[tuple[int, int]]


MIGRATION_DRIVERS: tuple[MigrationDriver, ...] = (
    MigrationDriver("mlx5_vfio_pci", frozenset({(0x15B3, 0x101E)})),
    MigrationDriver(
        "qat_vfio_pci", frozenset({(0x8086, 0x4941), (0x8086, 0x4943), (0x8086, 0x4945)})
    ),
    MigrationDriver(
        "hisi_acc_vfio_pci", frozenset({(0x19E5, 0xA256), (0x19E5, 0xA259), (0x19E5, 0xA251)})
    ),
    MigrationDriver("pds_vfio_pci", frozenset({(0x1DD8, 0x1003)})),
    MigrationDriver("virtio_vfio_pci", frozenset({(0x1AF4, 0x1041)})),
    MigrationDriver("xe_vfio_pci", frozenset()),
)

_BY_NAME: Mapping[str, MigrationDriver] = {d.name: d for d in MIGRATION_DRIVERS}
_BY_ID: Mapping[tuple[int, int], MigrationDriver] = {
    ids: d for d in MIGRATION_DRIVERS for ids in d.device_ids
}


@dataclass(frozen=True)
class Migratability:
    """Whether a function can be live-migrated while assigned through VFIO.

    Attributes:
        current_binding_migratable: it is bound to a migration-capable
            variant driver now.
        migration_driver: the migration-capable variant driver for its ids,
            None when none exists.
    """

    current_binding_migratable: bool
    migration_driver: str | None


def migration_driver_for(vendor_id: int, device_id: int) -> str | None:
    """The migration-capable variant driver for a vendor:device id, if any."""
    found = _BY_ID.get((vendor_id, device_id))
    return found.name if found is not None else None


def is_migration_driver(driver: str | None) -> bool:
    """Whether ``driver`` implements VFIO live migration."""
    return driver is not None and normalize_driver_name(driver) in _BY_NAME


def migratability(function: PciFunction) -> Migratability:
    """The migration rule above, applied to one function."""
    return Migratability(
        current_binding_migratable=is_migration_driver(function.driver),
        migration_driver=(
            migration_driver_for(function.vendor_id, function.device_id) if function.is_vf else None
        ),
    )
