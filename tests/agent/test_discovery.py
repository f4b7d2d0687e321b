"""Discovery assembles every probe and never fails on a missing subsystem."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from tessera.agent.discovery import HostReport, MigCapable, MigUnsupported, discover
from tessera.agent.nvml import (
    ComputeInstance,
    GpuInstance,
    GpuInstanceProfile,
    MigMode,
    MigModeState,
    MigPlacement,
    NullNvmlClient,
    NvmlClient,
    NvmlError,
    NvmlGpu,
)
from tessera.agent.probes.pci import PciAddress
from tessera.agent.probes.pcie import Locality
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

A100 = PciAddress("0000:4b:00.0")
TESLA_P4 = PciAddress("0000:b1:00.0")
LEGACY_NIC0 = PciAddress("0000:06:0d.0")
LEGACY_NIC1 = PciAddress("0000:06:0d.1")

A100_UUID = "GPU-4101de38-535a-4255-ac14-a63e072d7a10"
P4_UUID = "GPU-00000000-0000-0000-0000-0000000000p4"

THREE_G = GpuInstanceProfile(
    profile_id=9,
    name="3g.40gb",
    slice_count=3,
    memory_mib=40192,
    multiprocessor_count=42,
    placements=(MigPlacement(0, 4), MigPlacement(4, 4)),
)
ONE_GI = GpuInstance(
    gi_id=2,
    profile_id=9,
    placement=MigPlacement(4, 4),
    compute_instances=(ComputeInstance(0, 2, "MIG-d771d938-b556-4f9d-b742-2dd26b864023"),),
)


class VirtHostNvml:
    """NVML as the virt host's driver would answer: an A100 in MIG mode, a P4 without."""

    def __init__(self, *, fail_instances: bool = False) -> None:
        self._fail_instances = fail_instances

    def driver_version(self) -> str | None:
        return "550.54.15"

    def gpus(self) -> Sequence[NvmlGpu]:
        return (
            NvmlGpu(A100_UUID, "NVIDIA A100 80GB PCIe", "00000000:4B:00.0", 81920),
            NvmlGpu(P4_UUID, "Tesla P4", "00000000:B1:00.0", 7680),
        )

    def mig_mode(self, uuid: str) -> MigModeState | None:
        if uuid == A100_UUID:
            return MigModeState(MigMode.ENABLED, MigMode.ENABLED)
        return None

    def gpu_instance_profiles(self, uuid: str) -> Sequence[GpuInstanceProfile]:
        return (THREE_G,)

    def gpu_instances(self, uuid: str) -> Sequence[GpuInstance]:
        if self._fail_instances:
            raise NvmlError("NVML_ERROR_UNKNOWN")
        return (ONE_GI,)


def host(name: str, tmp_path: Path) -> Sysfs:
    root = tmp_path / name
    build(name, root)
    return Sysfs(root, KernelEmulator(root))


def run(sysfs: Sysfs, nvml: NvmlClient | None = None) -> HostReport:
    return discover(
        sysfs,
        nvml if nvml is not None else NullNvmlClient(),
        host_id="virt-1",
        boot_id="b00t",
        labels={"rack": "r7"},
    )


@pytest.fixture(scope="module")
def virt(tmp_path_factory: pytest.TempPathFactory) -> Sysfs:
    return host("virt-2s", tmp_path_factory.mktemp("virt"))


def test_a_report_holds_every_subsystem_of_the_virt_host(virt: Sysfs) -> None:
    report = run(virt)
    assert (report.host_id, report.boot_id, dict(report.labels)) == (
        "virt-1",
        "b00t",
        {"rack": "r7"},
    )
    assert A100 in report.functions and TESLA_P4 in report.functions
    assert report.iommu.present
    assert [n.node_id for n in report.numa_nodes] == [0, 1]
    assert any(pf.address == "0000:31:00.0" for pf in report.sriov_pfs)
    assert [p.address for p in report.mdev_parents] == [TESLA_P4]
    assert set(report.migratability) == set(report.functions)


def test_the_report_answers_group_and_locality_questions(virt: Sysfs) -> None:
    report = run(virt)
    group = report.group_of(LEGACY_NIC0)
    assert group is not None
    assert report.endpoints_of(group) == (LEGACY_NIC0, LEGACY_NIC1)
    assert report.locality(A100, TESLA_P4) == Locality.SYS


def test_without_nvml_the_report_says_why_gpus_are_missing(virt: Sysfs) -> None:
    report = run(virt)
    assert report.gpus == ()
    assert any(n.startswith("nvml:") and "driver" in n for n in report.notes)


def test_nvml_gpus_are_matched_to_sysfs_addresses(virt: Sysfs) -> None:
    report = run(virt, VirtHostNvml())
    gpus = {g.address: g for g in report.gpus}
    assert set(gpus) == {A100, TESLA_P4}
    a100 = gpus[A100]
    assert a100.model == "NVIDIA A100 80GB PCIe"
    assert isinstance(a100.mig, MigCapable)
    assert a100.mig.mode.current is MigMode.ENABLED
    assert a100.mig.profiles == (THREE_G,)
    assert a100.mig.instances == (ONE_GI,)
    assert isinstance(gpus[TESLA_P4].mig, MigUnsupported)
    assert not any(n.startswith("nvml:") for n in report.notes)


def test_an_nvml_failure_on_one_gpu_is_a_note_not_an_error(virt: Sysfs) -> None:
    report = run(virt, VirtHostNvml(fail_instances=True))
    a100 = next(g for g in report.gpus if g.address == A100)
    assert isinstance(a100.mig, MigCapable)
    assert a100.mig.instances == ()
    assert any(A100_UUID in n and "NVML_ERROR_UNKNOWN" in n for n in report.notes)


def test_a_host_without_iommu_is_reported_with_a_note(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    shutil.rmtree(sysfs.path("kernel", "iommu_groups"))
    report = run(sysfs)
    assert not report.iommu.present
    assert report.iommu.groups == {}
    assert report.functions, "PCI functions are still reported"
    assert any(n.startswith("iommu:") for n in report.notes)


def test_a_kernel_without_mdev_or_numa_is_reported_with_notes(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    shutil.rmtree(sysfs.path("class", "mdev_bus"))
    shutil.rmtree(sysfs.path("devices", "system", "node"))
    report = run(sysfs)
    assert report.mdev_parents == ()
    assert report.numa_nodes == ()
    assert any(n.startswith("mdev:") for n in report.notes)
    assert any(n.startswith("numa:") for n in report.notes)


def test_an_empty_root_gives_an_empty_report_not_an_error(tmp_path: Path) -> None:
    report = run(Sysfs(tmp_path))
    assert report.functions == {}
    assert not report.iommu.present
    assert any(n.startswith("pci:") for n in report.notes)


def test_every_fixture_host_is_discovered_without_error(tmp_path: Path) -> None:
    from tessera.agent.testing import hosts

    for name in sorted(hosts.FIXTURE_HOSTS):
        report = run(host(name, tmp_path))
        assert report.functions, name
        for number, group in report.iommu.groups.items():
            for member in group.members:
                assert report.group_of(member) == number


def test_the_no_iommu_host_is_reported_with_its_devices_and_a_note(tmp_path: Path) -> None:
    report = run(host("no-iommu", tmp_path))
    assert not report.iommu.present
    assert set(report.functions) >= {PciAddress("0000:01:00.0"), PciAddress("0000:02:00.0")}
    assert any(n.startswith("iommu:") and "passthrough" in n for n in report.notes)
