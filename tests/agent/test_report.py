"""The wire inventory carries everything discovery found, and nothing invented."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tessera.agent.actuation.vfio import VfioBinder
from tessera.agent.discovery import discover
from tessera.agent.nvml import NullNvmlClient
from tessera.agent.report import to_inventory
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.v1 import inventory_pb2

from .test_discovery import A100_UUID, VirtHostNvml

A100 = "0000:4b:00.0"
A100_PORT = "0000:4a:01.0"
CX6_PF0 = "0000:31:00.0"
E810_PF0 = "0000:cb:00.0"
LEGACY_BRIDGE = "0000:00:1e.0"
LEGACY_NICS = ["0000:06:0d.0", "0000:06:0d.1"]
TESLA_P4 = "0000:b1:00.0"


def host(name: str, tmp_path: Path) -> Sysfs:
    root = tmp_path / name
    build(name, root)
    return Sysfs(root, KernelEmulator(root))


def inventory(sysfs: Sysfs, generation: int = 7) -> inventory_pb2.HostInventory:
    report = discover(
        sysfs, NullNvmlClient(), host_id="virt-1", boot_id="b00t", labels={"rack": "r7"}
    )
    return to_inventory(report, generation)


def function(inv: inventory_pb2.HostInventory, address: str) -> inventory_pb2.PciFunction:
    return next(f for f in inv.pci_functions if f.address == address)


@pytest.fixture(scope="module")
def virt(tmp_path_factory: pytest.TempPathFactory) -> inventory_pb2.HostInventory:
    return inventory(host("virt-2s", tmp_path_factory.mktemp("virt")))


def test_host_fields(virt: inventory_pb2.HostInventory) -> None:
    assert (virt.host_id, virt.boot_id, virt.generation) == ("virt-1", "b00t", 7)
    assert dict(virt.labels) == {"rack": "r7"}
    assert virt.iommu_present
    assert any(n.startswith("nvml:") for n in virt.notes)


def test_a_gpu_function_carries_ids_place_and_group(virt: inventory_pb2.HostInventory) -> None:
    gpu = function(virt, A100)
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code) == (0x10DE, 0x20B5, 0x030200)
    assert gpu.driver == "nvidia"
    assert gpu.driver_override == ""
    assert gpu.numa_node == 0
    assert gpu.local_cpulist
    assert gpu.has_iommu_group
    assert gpu.root_bus == "pci0000:4a"
    assert list(gpu.bridge_chain) == [A100_PORT]
    assert gpu.role == inventory_pb2.PCI_ROLE_ENDPOINT
    assert gpu.HasField("link") and gpu.link.current_width > 0
    assert gpu.reset_methods
    assert gpu.physfn == ""
    assert not gpu.migratability.current_binding_migratable
    assert gpu.migratability.migration_driver == ""


def test_bridges_carry_their_roles(virt: inventory_pb2.HostInventory) -> None:
    assert function(virt, A100_PORT).role == inventory_pb2.PCI_ROLE_ROOT_PORT
    legacy = function(virt, LEGACY_BRIDGE)
    assert legacy.role == inventory_pb2.PCI_ROLE_PCI_BRIDGE
    assert not legacy.HasField("link"), "conventional PCI has no PCIe link"


def test_groups_list_members_bridges_included(virt: inventory_pb2.HostInventory) -> None:
    nic = function(virt, LEGACY_NICS[0])
    group = next(g for g in virt.iommu_groups if g.number == nic.iommu_group)
    assert list(group.members) == [LEGACY_BRIDGE, *LEGACY_NICS]
    assert group.type == inventory_pb2.IOMMU_GROUP_TYPE_DMA
    assert not group.viable
    assert group.vfio_path == ""


def test_every_function_is_in_the_group_it_names(virt: inventory_pb2.HostInventory) -> None:
    groups = {g.number: set(g.members) for g in virt.iommu_groups}
    for f in virt.pci_functions:
        assert f.has_iommu_group
        assert f.address in groups[f.iommu_group]


def test_numa_nodes(virt: inventory_pb2.HostInventory) -> None:
    assert [n.id for n in virt.numa_nodes] == [0, 1]
    assert [list(n.distances) for n in virt.numa_nodes] == [[10, 21], [21, 10]]
    assert all(n.memory_kib > 0 and n.cpulist for n in virt.numa_nodes)


def test_sriov_pf_and_its_vfs(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    numvfs = sysfs.path("bus", "pci", "devices", CX6_PF0, "sriov_numvfs")
    if sysfs.read(numvfs) != "0":
        sysfs.write(numvfs, "0")
    sysfs.write(numvfs, "2")
    inv = inventory(sysfs)
    pf = next(p for p in inv.sriov_pfs if p.address == CX6_PF0)
    assert (pf.num_vfs, pf.vf_offset, pf.vf_stride, pf.vf_device_id) == (2, 2, 1, 0x101E)
    assert [(v.index, v.address) for v in pf.vfs] == [(0, "0000:31:00.2"), (1, "0000:31:00.3")]
    assert all(v.has_iommu_group for v in pf.vfs)
    vf = function(inv, "0000:31:00.2")
    assert vf.physfn == CX6_PF0
    assert vf.migratability.migration_driver == "mlx5_vfio_pci"


def test_a_pf_without_vfs_reports_the_migration_driver_of_the_vfs_it_would_create(
    virt: inventory_pb2.HostInventory,
) -> None:
    pfs = {p.address: p for p in virt.sriov_pfs}
    assert (pfs[CX6_PF0].num_vfs, list(pfs[CX6_PF0].vfs)) == (0, [])
    assert pfs[CX6_PF0].vf_migration_driver == "mlx5_vfio_pci"
    assert pfs[E810_PF0].vf_migration_driver == ""  # unset: no variant driver for 8086:1889


def test_mdev_parent_types_and_instances(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    created = str(uuid.uuid4())
    parent = sysfs.path("bus", "pci", "devices", TESLA_P4)
    sysfs.write(parent / "mdev_supported_types" / "nvidia-63" / "create", created)
    inv = inventory(sysfs)
    (p4,) = [p for p in inv.mdev_parents if p.address == TESLA_P4]
    assert p4.single_type
    q1 = next(t for t in p4.types if t.id == "nvidia-63")
    assert (q1.name, q1.device_api) == ("GRID P4-1Q", "vfio-pci")
    assert list(q1.instances) == [created]
    (instance,) = p4.instances
    assert (instance.uuid, instance.type_id) == (created, "nvidia-63")
    # The mdev's own group is not a PCI group: it is not among iommu_groups.
    assert all(created not in g.members for g in inv.iommu_groups)
    assert instance.iommu_group not in {g.number for g in inv.iommu_groups}


def test_a_bound_group_reports_its_vfio_path_and_viability(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    VfioBinder(sysfs).bind_group(LEGACY_NICS)
    inv = inventory(sysfs)
    number = function(inv, LEGACY_NICS[0]).iommu_group
    group = next(g for g in inv.iommu_groups if g.number == number)
    assert group.viable
    assert group.vfio_path == f"/dev/vfio/{number}"
    assert function(inv, LEGACY_NICS[0]).driver == "vfio-pci"
    assert function(inv, LEGACY_NICS[0]).driver_override == "vfio-pci"


def test_gpus_from_nvml_with_mig(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    report = discover(sysfs, VirtHostNvml(), host_id="h", boot_id="b", labels={})
    inv = to_inventory(report, 1)
    gpus = {g.address: g for g in inv.gpus}
    a100 = gpus[A100]
    assert (a100.uuid, a100.model, a100.memory_mib) == (A100_UUID, "NVIDIA A100 80GB PCIe", 81920)
    assert a100.mig_mode_current == inventory_pb2.MIG_MODE_ENABLED
    assert a100.mig_mode_pending == inventory_pb2.MIG_MODE_ENABLED
    (profile,) = a100.mig_profiles
    assert (profile.name, profile.profile_id, profile.slice_count) == ("3g.40gb", 9, 3)
    assert [(p.start, p.size) for p in profile.placements] == [(0, 4), (4, 4)]
    (gi,) = a100.gpu_instances
    assert (gi.id, gi.profile_id, gi.placement.start, gi.placement.size) == (2, 9, 4, 4)
    assert [ci.uuid for ci in gi.compute_instances] == ["MIG-d771d938-b556-4f9d-b742-2dd26b864023"]
    p4 = gpus[TESLA_P4]
    assert p4.mig_mode_current == inventory_pb2.MIG_MODE_UNSUPPORTED
    assert p4.mig_mode_pending == inventory_pb2.MIG_MODE_UNSUPPORTED


def test_the_same_host_gives_the_same_bytes(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    first = inventory(sysfs).SerializeToString(deterministic=True)
    assert inventory(sysfs).SerializeToString(deterministic=True) == first
