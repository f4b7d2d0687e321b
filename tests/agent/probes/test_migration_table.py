"""Which drivers can live-migrate which devices (HW_FACTS §10)."""

from __future__ import annotations

from tessera.agent.probes.migration import (
    MIGRATION_DRIVERS,
    Migratability,
    is_migration_driver,
    migratability,
    migration_driver_for,
)
from tessera.agent.probes.pci import PciAddress, PciFunction


def test_mlx5_vfio_pci_takes_only_the_mlx5gen_vf() -> None:
    assert migration_driver_for(0x15B3, 0x101E) == "mlx5_vfio_pci"
    assert migration_driver_for(0x15B3, 0x1018) is None  # ConnectX-5 VF
    assert migration_driver_for(0x15B3, 0x101D) is None  # the CX-6 Dx PF itself


def test_qat_4xxx_family_vfs_migrate_through_qat_vfio_pci() -> None:
    for device in (0x4941, 0x4943, 0x4945):
        assert migration_driver_for(0x8086, device) == "qat_vfio_pci"
    assert migration_driver_for(0x8086, 0x4940) is None  # the PF


def test_plain_vfio_pci_and_nvgrace_are_not_migration_drivers() -> None:
    assert not is_migration_driver("vfio-pci")
    assert not is_migration_driver("nvgrace_gpu_vfio_pci")
    assert not is_migration_driver(None)


def test_variant_drivers_registered_with_dashes_are_recognised() -> None:
    assert is_migration_driver("mlx5_vfio_pci")
    assert is_migration_driver("hisi-acc-vfio-pci")


def test_every_table_entry_is_a_vfio_variant_module_name() -> None:
    for driver in MIGRATION_DRIVERS:
        assert driver.name.endswith("_vfio_pci")


def function(vendor: int, device: int, *, physfn: str | None, drv: str | None) -> PciFunction:
    return PciFunction(
        address=PciAddress("0000:00:03.0"),
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=vendor,
        subsystem_device_id=0,
        class_code=0x020000,
        driver=drv,
        driver_override=None,
        numa_node=-1,
        local_cpulist=None,
        link=None,
        reset_methods=(),
        physfn=PciAddress(physfn) if physfn else None,
        device_path=(),
    )


def test_a_plain_virtio_nic_is_not_offered_a_migration_driver() -> None:
    # 1af4:1041 is every modern virtio-net device; only a VF can migrate.
    assert migratability(function(0x1AF4, 0x1041, physfn=None, drv="virtio-pci")) == (
        Migratability(current_binding_migratable=False, migration_driver=None)
    )
    vf = function(0x1AF4, 0x1041, physfn="0000:00:02.0", drv=None)
    assert migratability(vf).migration_driver == "virtio_vfio_pci"


def test_the_current_binding_decides_migratable_now() -> None:
    vf = function(0x15B3, 0x101E, physfn="0000:31:00.0", drv="vfio-pci")
    assert not migratability(vf).current_binding_migratable
    vf = function(0x15B3, 0x101E, physfn="0000:31:00.0", drv="mlx5_vfio_pci")
    assert migratability(vf) == Migratability(True, "mlx5_vfio_pci")
