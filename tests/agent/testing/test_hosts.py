"""Fixture hosts: each is the topology its docstring draws and its source describes."""

from __future__ import annotations

import os
from pathlib import Path

from tessera.agent.sysfs import Sysfs
from tessera.agent.testing import hosts
from tessera.agent.testing.kernel import KernelEmulator

from .fakehost import FakeHost

BuiltHosts = dict[str, FakeHost]


def functions(host: FakeHost) -> list[str]:
    return sorted(os.listdir(host.sys / "bus" / "pci" / "devices"))


def by_class(host: FakeHost, prefix: str) -> list[str]:
    """Functions whose class starts with ``prefix`` (``0x0302``)."""
    return [b for b in functions(host) if host.read(host.dev(b) / "class").startswith(prefix)]


def chain(host: FakeHost, bdf: str) -> str:
    """The device's real path below ``sys/devices``."""
    return os.path.relpath(os.path.realpath(host.dev(bdf)), os.path.realpath(host.sys / "devices"))


def test_the_registry_names_every_fixture() -> None:
    assert sorted(hosts.FIXTURE_HOSTS) == [
        "dgx-a100", "gpu-workstation", "hgx-8gpu", "no-iommu", "noacs-switch", "pcie-a100-mig",
        "sriov-large", "sriov-nic", "vgpu", "virt-2s",
    ]  # fmt: skip
    assert all(h.summary and h.build is hosts.FIXTURE_HOSTS[n] for n, h in hosts.FIXTURES.items())
    for build in hosts.FIXTURE_HOSTS.values():
        assert build.__doc__ is not None and "[" in build.__doc__  # cites confidence


def test_every_fixture_is_a_complete_fake_host(built: BuiltHosts) -> None:
    for name, host in built.items():
        assert (host.root / ".tessera-fake-host").is_file(), name
        assert (host.sys / "bus" / "pci" / "drivers" / "vfio-pci" / "bind").exists(), name
        assert (host.sys / "bus" / "pci" / "drivers_probe").exists(), name
        assert functions(host), name
        for bdf in functions(host):
            # Every link resolves inside the tree.
            assert (host.dev(bdf) / "vendor").is_file(), (name, bdf)
            driver = host.driver(bdf)
            if driver is not None:
                assert (host.drv(driver) / bdf).resolve() == host.dev(bdf).resolve()


def test_virt_2s_has_its_accelerators_where_the_reference_puts_them(built: BuiltHosts) -> None:
    host = built["virt-2s"]
    assert by_class(host, "0x0302") == ["0000:4b:00.0", "0000:b1:00.0"]
    assert host.group("0000:4b:00.0") == 5
    assert host.group("0000:b1:00.0") == 8
    assert host.read(host.dev("0000:b1:00.0") / "numa_node") == "1\n"
    assert chain(host, "0000:06:0d.1") == "pci0000:00/0000:00:1e.0/0000:06:0d.1"
    assert sorted(os.listdir(host.sys / "class" / "mdev_bus")) == ["0000:b1:00.0"]
    for pf, total in (
        ("0000:31:00.0", 8),
        ("0000:31:00.1", 8),
        ("0000:6b:00.0", 16),
        ("0000:cb:00.0", 64),
        ("0000:cb:00.1", 64),
    ):
        assert host.read(host.dev(pf) / "sriov_totalvfs") == f"{total}\n"
        assert host.read(host.dev(pf) / "sriov_numvfs") == "0\n"


def test_dgx_a100_pairs_each_gpu_with_two_switches_and_its_nics(built: BuiltHosts) -> None:
    host = built["dgx-a100"]
    gpus = by_class(host, "0x0302")
    assert [g[5:7] for g in gpus] == ["07", "0f", "47", "4e", "87", "90", "b7", "bd"]
    numa = {g: host.read(host.dev(g) / "numa_node").strip() for g in gpus}
    assert list(numa.values()) == ["3", "3", "1", "1", "7", "7", "5", "5"]
    assert all(host.driver(g) == "nvidia" for g in gpus)
    assert chain(host, "0000:07:00.0") == (
        "pci0000:00/0000:00:01.1/0000:01:00.0/0000:02:00.0/0000:05:00.0/0000:06:00.0/0000:07:00.0"
    )
    # GPU0 and mlx5_0 meet at the first switch (PXB in nvidia-smi topo -m).
    assert chain(host, "0000:0c:00.0").startswith("pci0000:00/0000:00:01.1/0000:01:00.0/")
    nics = by_class(host, "0x0207")
    assert [n[5:7] for n in nics] == ["0c", "12", "4b", "54", "8d", "94", "ba", "cc"]
    assert by_class(host, "0x0200") == ["0000:61:00.0", "0000:61:00.1", "0000:e1:00.0",
                                        "0000:e1:00.1"]  # fmt: skip
    assert len(os.listdir(host.sys / "devices" / "system" / "node")) == 8 + 5


def test_gpu_workstation_groups_each_gpu_with_its_audio(built: BuiltHosts) -> None:
    host = built["gpu-workstation"]
    assert by_class(host, "0x0300") == ["0000:01:00.0", "0000:02:00.0"]
    assert by_class(host, "0x0403") == ["0000:01:00.1", "0000:02:00.1"]
    assert host.read(host.dev("0000:01:00.0") / "device") == "0x2230\n"
    assert host.read(host.dev("0000:01:00.1") / "device") == "0x1aef\n"
    assert host.group("0000:01:00.0") == host.group("0000:01:00.1") == 1
    assert host.group("0000:02:00.0") == host.group("0000:02:00.1") == 2
    assert host.driver("0000:01:00.1") == "snd_hda_intel"


def test_hgx_8gpu_puts_each_gpu_under_the_switch_of_its_nic(built: BuiltHosts) -> None:
    host = built["hgx-8gpu"]
    gpus = by_class(host, "0x0302")
    nics = by_class(host, "0x0207")
    assert len(gpus) == len(nics) == 8
    # The real C2789 GPU0 path (HW_FACTS §4).
    assert chain(host, "0000:0a:00.0") == (
        "pci0000:04/0000:04:01.0/0000:05:00.0/0000:06:02.0/0000:08:00.0/0000:09:00.0/0000:0a:00.0"
    )
    assert (
        chain(host, "0000:07:00.0")
        == "pci0000:04/0000:04:01.0/0000:05:00.0/0000:06:00.0/0000:07:00.0"
    )
    for gpu, nic in zip(gpus, nics, strict=True):
        assert chain(host, gpu).split("/")[:3] == chain(host, nic).split("/")[:3]
        assert host.group(gpu) != host.group(nic)


def test_noacs_switch_shares_one_group_between_both_gpus(built: BuiltHosts) -> None:
    host = built["noacs-switch"]
    gpus = by_class(host, "0x0302")
    assert len(gpus) == 2
    assert host.group(gpus[0]) == host.group(gpus[1]) == 0
    assert host.group("0000:05:00.0") == 2


def test_vgpu_has_two_single_type_mdev_parents(built: BuiltHosts) -> None:
    host = built["vgpu"]
    parents = sorted(os.listdir(host.sys / "class" / "mdev_bus"))
    assert parents == ["0000:3b:00.0", "0000:d8:00.0"]
    types = sorted(os.listdir(host.dev("0000:d8:00.0") / "mdev_supported_types"))
    assert types == ["nvidia-256", "nvidia-257", "nvidia-258", "nvidia-259"]
    name = host.dev("0000:d8:00.0") / "mdev_supported_types" / "nvidia-259" / "name"
    assert host.read(name) == "GRID RTX6000-4Q\n"


def test_sriov_nic_has_four_pfs(built: BuiltHosts) -> None:
    host = built["sriov-nic"]
    pfs = [b for b in functions(host) if (host.dev(b) / "sriov_totalvfs").exists()]
    assert pfs == ["0000:31:00.0", "0000:31:00.1", "0000:cb:00.0", "0000:cb:00.1"]


def test_no_iommu_has_devices_but_no_groups(built: BuiltHosts) -> None:
    host = built["no-iommu"]
    assert by_class(host, "0x0302") == ["0000:01:00.0"]
    assert host.groups() == []


def test_build_accepts_a_fresh_directory(tree_dir: Path) -> None:
    hosts.build("gpu-workstation", tree_dir / "nested" / "ws")
    assert (tree_dir / "nested" / "ws" / "sys" / "bus" / "pci" / "devices").is_dir()


def test_the_large_sriov_host_passes_two_hundred_functions_with_every_vf_on(
    tree_dir: Path,
) -> None:
    hosts.build("sriov-large", tree_dir)
    sysfs = Sysfs(tree_dir, KernelEmulator(tree_dir))
    devices = sysfs.path("bus", "pci", "devices")
    for pf in ("0000:31:00.0", "0000:31:00.1", "0000:b1:00.0", "0000:b1:00.1"):
        sysfs.write(devices / pf / "sriov_numvfs", "64")
    assert len(sysfs.listdir(devices)) == 262
