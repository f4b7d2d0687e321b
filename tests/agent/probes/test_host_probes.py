"""Each probe against the fixture hosts, as the kernel would show them."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tessera.agent.actuation.vfio import VfioBinder
from tessera.agent.probes.iommu import IommuDomainType, probe_iommu
from tessera.agent.probes.mdev import MdevInstance, probe_mdev
from tessera.agent.probes.migration import migratability
from tessera.agent.probes.numa import probe_numa
from tessera.agent.probes.pci import PciAddress, PciFunction, probe_pci
from tessera.agent.probes.pcie import Locality, PciRole, probe_tree
from tessera.agent.probes.sriov import SriovPf, probe_sriov
from tessera.agent.probes.vfio import probe_vfio
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

A = PciAddress
LEGACY_BRIDGE, LEGACY_NIC0, LEGACY_NIC1 = A("0000:00:1e.0"), A("0000:06:0d.0"), A("0000:06:0d.1")
CX6_PF0, CX6_PF1 = A("0000:31:00.0"), A("0000:31:00.1")
QAT_PF = A("0000:6b:00.0")
A100, A100_PORT = A("0000:4b:00.0"), A("0000:4a:01.0")
TESLA_P4 = A("0000:b1:00.0")
E810_0 = A("0000:cb:00.0")

#: DGX A100 (HW_FACTS §11.3): GPU0/1 on NUMA node 3, GPU4 on node 7; mlx5_0
#: sits beside GPU0 under one PCIe switch; mlx5_4/5 are one dual-port card.
DGX_GPU0, DGX_GPU1, DGX_GPU4 = A("0000:07:00.0"), A("0000:0f:00.0"), A("0000:87:00.0")
DGX_MLX5_0 = A("0000:0c:00.0")


def host(name: str, tmp_path: Path) -> Sysfs:
    root = tmp_path / name
    build(name, root)
    return Sysfs(root, KernelEmulator(root))


def pci(sysfs: Sysfs) -> dict[PciAddress, PciFunction]:
    return {f.address: f for f in probe_pci(sysfs)}


@pytest.fixture(scope="module")
def virt(tmp_path_factory: pytest.TempPathFactory) -> Sysfs:
    """A read-only virt-2s host shared by the tests that only look."""
    return host("virt-2s", tmp_path_factory.mktemp("virt"))


@pytest.fixture(scope="module")
def dgx(tmp_path_factory: pytest.TempPathFactory) -> Sysfs:
    return host("dgx-a100", tmp_path_factory.mktemp("dgx"))


# -- PCI ------------------------------------------------------------------


def test_the_a100_reads_as_sysfs_prints_it(virt: Sysfs) -> None:
    gpu = pci(virt)[A100]
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code) == (0x10DE, 0x20B5, 0x030200)
    assert gpu.driver == "nvidia"
    assert gpu.driver_override is None, "(null) means no override"
    assert gpu.numa_node == 0
    assert gpu.local_cpulist
    assert gpu.link is not None and gpu.link.current_speed.endswith("GT/s PCIe")
    assert gpu.physfn is None
    assert gpu.device_path == ("pci0000:4a", A100_PORT, A100)


def test_conventional_pci_functions_have_no_link(virt: Sysfs) -> None:
    functions = pci(virt)
    assert functions[LEGACY_BRIDGE].link is None
    assert functions[LEGACY_NIC0].link is None
    assert functions[LEGACY_BRIDGE].is_bridge
    assert not functions[LEGACY_NIC0].is_bridge


def test_a_function_with_an_override_reports_it(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    sysfs.write(sysfs.path("bus", "pci", "devices", E810_0, "driver_override"), "vfio-pci\n")
    assert pci(sysfs)[E810_0].driver_override == "vfio-pci"


# -- PCIe tree ------------------------------------------------------------


def test_roles_on_the_virt_host(virt: Sysfs) -> None:
    tree = probe_tree(virt, probe_pci(virt))
    roles = {a: p.role for a, p in tree.positions.items()}
    assert roles[LEGACY_BRIDGE] == PciRole.PCI_BRIDGE
    assert roles[LEGACY_NIC0] == PciRole.ENDPOINT
    assert roles[A100_PORT] == PciRole.ROOT_PORT
    assert roles[A100] == PciRole.ENDPOINT
    assert roles[QAT_PF] == PciRole.RCIEP, "the QAT PF sits on its root bus with no port"


def test_the_a100_hangs_off_its_root_port(virt: Sysfs) -> None:
    position = probe_tree(virt, probe_pci(virt)).positions[A100]
    assert position.root_bus == "pci0000:4a"
    assert position.bridge_chain == (A100_PORT,)


def test_dgx_switch_ports_alternate_below_the_root_port(dgx: Sysfs) -> None:
    tree = probe_tree(dgx, probe_pci(dgx))
    chain = tree.positions[DGX_GPU0].bridge_chain
    assert [tree.positions[b].role for b in chain] == [
        PciRole.ROOT_PORT,
        PciRole.SWITCH_UPSTREAM,
        PciRole.SWITCH_DOWNSTREAM,
        PciRole.SWITCH_UPSTREAM,
        PciRole.SWITCH_DOWNSTREAM,
    ]


def test_locality_of_two_gpus_across_dgx_sockets_is_sys(dgx: Sysfs) -> None:
    assert probe_tree(dgx, probe_pci(dgx)).locality(DGX_GPU0, DGX_GPU4) == Locality.SYS


def test_a_dgx_gpu_and_its_nic_share_a_switch_tree_pxb(dgx: Sysfs) -> None:
    tree = probe_tree(dgx, probe_pci(dgx))
    assert tree.locality(DGX_GPU0, DGX_MLX5_0) == Locality.PXB
    assert tree.locality(DGX_GPU0, DGX_GPU1) == Locality.PXB


def test_locality_on_the_virt_host(virt: Sysfs) -> None:
    tree = probe_tree(virt, probe_pci(virt))
    assert tree.locality(LEGACY_NIC0, LEGACY_NIC1) == Locality.PIX
    assert tree.locality(CX6_PF0, CX6_PF1) == Locality.PIX
    assert tree.locality(CX6_PF0, A100) == Locality.NODE, "two root buses of socket 0"
    assert tree.locality(A100, TESLA_P4) == Locality.SYS


# -- IOMMU ----------------------------------------------------------------


def test_the_legacy_bridge_group_has_three_members_and_two_endpoints(virt: Sysfs) -> None:
    iommu = probe_iommu(virt, probe_pci(virt))
    group = iommu.group_of(LEGACY_NIC0)
    assert group is not None
    assert iommu.group_of(LEGACY_BRIDGE) == group == iommu.group_of(LEGACY_NIC1)
    assert iommu.groups[group].members == (LEGACY_BRIDGE, LEGACY_NIC0, LEGACY_NIC1)
    assert iommu.endpoints_of(group) == (LEGACY_NIC0, LEGACY_NIC1)


def test_the_legacy_bridge_group_is_not_viable_while_e1000_holds_it(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    group = iommu.group_of(LEGACY_NIC0)
    assert group is not None
    assert not iommu.groups[group].viable

    VfioBinder(sysfs).bind_group(iommu.endpoints_of(group))

    assert probe_iommu(sysfs, probe_pci(sysfs)).groups[group].viable


def test_a_root_port_alone_on_pcieport_is_viable(virt: Sysfs) -> None:
    iommu = probe_iommu(virt, probe_pci(virt))
    group = iommu.group_of(A100_PORT)
    assert group is not None
    assert iommu.groups[group].viable
    assert iommu.endpoints_of(group) == ()


def test_groups_report_their_default_domain(virt: Sysfs) -> None:
    iommu = probe_iommu(virt, probe_pci(virt))
    assert iommu.present
    group = iommu.group_of(A100)
    assert group is not None
    assert iommu.groups[group].domain_type == IommuDomainType.DMA


def test_a_function_outside_any_group_has_none(virt: Sysfs) -> None:
    assert probe_iommu(virt, probe_pci(virt)).group_of(A("0000:ee:00.0")) is None


def test_without_iommu_groups_the_iommu_is_absent(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    shutil.rmtree(sysfs.path("kernel", "iommu_groups"))
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    assert not iommu.present
    assert iommu.group_of(A100) is None


# -- NUMA -----------------------------------------------------------------


def test_numa_nodes_of_the_two_socket_host(virt: Sysfs) -> None:
    nodes = probe_numa(virt)
    assert nodes is not None
    assert [n.node_id for n in nodes] == [0, 1]
    assert [n.distances for n in nodes] == [(10, 21), (21, 10)]
    assert all(n.memory_kib for n in nodes)
    assert not set(nodes[0].cpus) & set(nodes[1].cpus)


def test_a_kernel_without_numa_directory_gives_none(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    shutil.rmtree(sysfs.path("devices", "system", "node"))
    assert probe_numa(sysfs) is None


# -- SR-IOV ---------------------------------------------------------------


def enable_vfs(sysfs: Sysfs, pf: str, count: int) -> None:
    numvfs = sysfs.path("bus", "pci", "devices", pf, "sriov_numvfs")
    if sysfs.read(numvfs) != "0":
        sysfs.write(numvfs, "0")
    sysfs.write(numvfs, str(count))


def test_vfs_of_the_connectx_pf_follow_offset_and_stride(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    enable_vfs(sysfs, CX6_PF0, 4)
    functions = probe_pci(sysfs)
    iommu = probe_iommu(sysfs, functions)
    pf = next(p for p in probe_sriov(sysfs, functions, iommu.by_address) if p.address == CX6_PF0)

    assert (pf.num_vfs, pf.vf_offset, pf.vf_stride, pf.vf_device_id) == (4, 2, 1, 0x101E)
    assert pf.total_vfs >= 4
    assert [v.index for v in pf.vfs] == [0, 1, 2, 3]
    assert [v.address for v in pf.vfs] == [f"0000:31:00.{i}" for i in range(2, 6)]
    groups = [v.iommu_group for v in pf.vfs]
    assert None not in groups and len(set(groups)) == 4, "each VF in its own group"


def test_a_vf_knows_its_pf_and_can_migrate_through_mlx5_vfio_pci(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    enable_vfs(sysfs, CX6_PF0, 1)
    vf = pci(sysfs)[A("0000:31:00.2")]
    assert vf.physfn == CX6_PF0
    assert vf.device_id == 0x101E
    status = migratability(vf)
    assert status.migration_driver == "mlx5_vfio_pci"
    assert not status.current_binding_migratable


def test_the_connectx_pf_itself_has_no_migration_driver(virt: Sysfs) -> None:
    assert migratability(pci(virt)[CX6_PF0]).migration_driver is None


def sriov_pfs(sysfs: Sysfs) -> dict[PciAddress, SriovPf]:
    functions = probe_pci(sysfs)
    return {
        p.address: p
        for p in probe_sriov(sysfs, functions, probe_iommu(sysfs, functions).by_address)
    }


def test_a_pf_without_vfs_names_the_migration_driver_its_vfs_will_have(virt: Sysfs) -> None:
    # No VF exists at build time: sriov_vf_device alone says what they will be.
    pfs = sriov_pfs(virt)

    assert (pfs[CX6_PF0].num_vfs, pfs[CX6_PF0].vfs) == (0, ())
    assert pfs[CX6_PF0].vf_migration_driver == "mlx5_vfio_pci"  # VFs 15b3:101e
    assert pfs[QAT_PF].vf_migration_driver == "qat_vfio_pci"  # VFs 8086:4941
    assert pfs[E810_0].vf_migration_driver is None  # VFs 8086:1889: iavf, no variant driver


def test_a_pf_keeps_naming_its_vfs_migration_driver_once_they_exist(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    enable_vfs(sysfs, CX6_PF0, 2)

    pf = sriov_pfs(sysfs)[CX6_PF0]

    assert pf.num_vfs == 2
    assert pf.vf_migration_driver == "mlx5_vfio_pci"


def test_a_pf_whose_vf_device_id_cannot_be_read_names_no_migration_driver(
    tmp_path: Path,
) -> None:
    sysfs = host("virt-2s", tmp_path)
    # A kernel without the attribute (it came with Linux 4.x): nothing is guessed.
    (sysfs.path("bus", "pci", "devices", CX6_PF0) / "sriov_vf_device").unlink()

    pf = sriov_pfs(sysfs)[CX6_PF0]

    assert (pf.vf_device_id, pf.vf_migration_driver) == (0, None)


# -- mdev -----------------------------------------------------------------


def test_the_tesla_p4_is_a_single_type_mdev_parent(virt: Sysfs) -> None:
    parents = probe_mdev(virt, pci(virt))
    assert parents is not None
    (p4,) = [p for p in parents if p.address == TESLA_P4]
    assert p4.single_type
    type_ids = {t.type_id for t in p4.types}
    assert "nvidia-63" in type_ids
    q1 = next(t for t in p4.types if t.type_id == "nvidia-63")
    assert q1.name == "GRID P4-1Q"
    assert q1.device_api == "vfio-pci"
    assert q1.description is not None and "framebuffer=1024M" in q1.description


def test_a_created_mdev_is_listed_with_its_own_group(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    created = str(uuid.uuid4())
    parent = sysfs.path("bus", "pci", "devices", TESLA_P4)
    sysfs.write(parent / "mdev_supported_types" / "nvidia-63" / "create", created)

    parents = probe_mdev(sysfs, pci(sysfs))
    assert parents is not None
    (p4,) = [p for p in parents if p.address == TESLA_P4]
    instances: dict[str, MdevInstance] = {i.uuid: i for i in p4.instances}
    assert created in instances
    assert instances[created].type_id == "nvidia-63"
    assert instances[created].iommu_group is not None
    q1 = next(t for t in p4.types if t.type_id == "nvidia-63")
    assert created in q1.instances
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    number = instances[created].iommu_group
    assert number is not None
    group = iommu.groups[number]
    assert group.mdev_members == (created,)
    assert group.members == ()


# -- VFIO -----------------------------------------------------------------


def test_a_bound_group_shows_its_dev_vfio_node(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    VfioBinder(sysfs).bind_group([A100])
    functions = probe_pci(sysfs)
    iommu = probe_iommu(sysfs, functions)
    group = iommu.group_of(A100)
    assert group is not None

    state = probe_vfio(sysfs, functions, iommu.by_address)

    assert set(state.bindings) == {A100}
    assert state.bindings[A100].driver == "vfio-pci"
    assert state.bindings[A100].group_node == f"/dev/vfio/{group}"
    assert state.group_nodes == {group: f"/dev/vfio/{group}"}
    assert state.missing_nodes == ()


def test_nothing_on_vfio_means_no_nodes(virt: Sysfs) -> None:
    functions = probe_pci(virt)
    state = probe_vfio(virt, functions, probe_iommu(virt, functions).by_address)
    assert state.bindings == {}
    assert state.group_nodes == {}


# -- cross-check against the fixtures' own description ----------------------

#: The fixture marker's role names, as PciRole.
_MARKER_ROLES = {
    "endpoint": PciRole.ENDPOINT,
    "rciep": PciRole.RCIEP,
    "root_port": PciRole.ROOT_PORT,
    "switch_upstream": PciRole.SWITCH_UPSTREAM,
    "switch_downstream": PciRole.SWITCH_DOWNSTREAM,
    "pci_bridge": PciRole.PCI_BRIDGE,
}


def test_roles_inferred_from_the_tree_match_every_fixture_host(tmp_path: Path) -> None:
    import json

    from tessera.agent.sysfs import FAKE_HOST_MARKER
    from tessera.agent.testing import hosts

    for name in sorted(hosts.FIXTURE_HOSTS):
        sysfs = host(name, tmp_path)
        declared = json.loads((sysfs.root / FAKE_HOST_MARKER).read_text())["functions"]
        tree = probe_tree(sysfs, probe_pci(sysfs))
        inferred = {a: p.role for a, p in tree.positions.items() if a in declared}
        expected = {a: _MARKER_ROLES[d["role"]] for a, d in declared.items()}
        assert inferred == expected, name


# -- the other fixture hosts --------------------------------------------------


def test_two_gpus_behind_a_switch_without_acs_are_one_group(tmp_path: Path) -> None:
    sysfs = host("noacs-switch", tmp_path)
    functions = probe_pci(sysfs)
    iommu = probe_iommu(sysfs, functions)
    gpus = (A("0000:03:00.0"), A("0000:04:00.0"))
    group = iommu.group_of(gpus[0])
    assert group is not None and iommu.group_of(gpus[1]) == group
    assert iommu.endpoints_of(group) == gpus, "the ports stay out of the endpoints"
    assert len(iommu.groups[group].members) > len(gpus)
    assert probe_tree(sysfs, functions).locality(*gpus) == Locality.PXB


def test_each_hgx_gpu_is_pxb_from_its_nic_and_sys_from_the_other_socket(tmp_path: Path) -> None:
    sysfs = host("hgx-8gpu", tmp_path)
    tree = probe_tree(sysfs, probe_pci(sysfs))
    gpu0, nic0, gpu4 = A("0000:0a:00.0"), A("0000:07:00.0"), A("0000:9d:00.0")
    assert tree.locality(gpu0, nic0) == Locality.PXB
    assert tree.locality(gpu0, gpu4) == Locality.SYS
    assert tree.positions[gpu0].bridge_chain[0] == "0000:04:01.0"


def test_a_host_with_the_iommu_off_has_no_groups(tmp_path: Path) -> None:
    sysfs = host("no-iommu", tmp_path)
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    assert not iommu.present
    assert iommu.groups == {}
    assert iommu.group_of(A("0000:01:00.0")) is None


def test_a_time_sliced_vgpu_parent_offers_only_the_type_in_use(tmp_path: Path) -> None:
    sysfs = host("vgpu", tmp_path)
    p4 = A("0000:3b:00.0")
    parent = sysfs.path("bus", "pci", "devices", p4, "mdev_supported_types")
    sysfs.write(parent / "nvidia-63" / "create", str(uuid.uuid4()))

    parents = probe_mdev(sysfs, pci(sysfs))
    assert parents is not None
    assert all(p.single_type for p in parents)
    (found,) = [p for p in parents if p.address == p4]
    available = {t.type_id: t.available_instances for t in found.types}
    assert available["nvidia-63"] > 0
    assert all(n == 0 for t, n in available.items() if t != "nvidia-63")


def test_a_vf_on_its_migration_driver_is_migratable_and_its_group_viable(tmp_path: Path) -> None:
    sysfs = host("sriov-nic", tmp_path)
    enable_vfs(sysfs, CX6_PF0, 1)
    vf = A("0000:31:00.2")
    device = sysfs.path("bus", "pci", "devices", vf)
    # driverctl's sequence by hand: mlx5_vfio_pci only binds through an override.
    if (current := pci(sysfs)[vf].driver) is not None:
        sysfs.write(sysfs.path("bus", "pci", "drivers", current, "unbind"), vf)
    sysfs.write(device / "driver_override", "mlx5_vfio_pci")
    sysfs.write(sysfs.path("bus", "pci", "drivers_probe"), vf)

    functions = probe_pci(sysfs)
    function = next(f for f in functions if f.address == vf)
    assert function.driver == "mlx5_vfio_pci"
    assert migratability(function).current_binding_migratable
    iommu = probe_iommu(sysfs, functions)
    group = iommu.group_of(vf)
    assert group is not None and iommu.groups[group].viable
    state = probe_vfio(sysfs, functions, iommu.by_address)
    assert state.bindings[vf].group_node == f"/dev/vfio/{group}"
