"""KernelEmulator: sysfs writes have Linux's effects and errno (HW_FACTS §2, §3, §6, §7)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.agent.sysfs import FAKE_HOST_MARKER, OsSysfsWriter, Sysfs
from tessera.agent.testing.fakesysfs import FakeSysfs, PciId, Role
from tessera.agent.testing.kernel import KernelEmulator

from .fakehost import FakeHost

MakeHost = Callable[[str], FakeHost]

GPU = "0000:01:00.0"  # gpu-workstation: RTX A6000, group 1 with 01:00.1 and 00:01.0
AUDIO = "0000:01:00.1"
CX_PF0 = "0000:31:00.0"  # virt-2s / sriov-nic: ConnectX-6 Dx PF0 (offset 2)
CX_PF1 = "0000:31:00.1"  # PF1 (offset 9)
UUID = "6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01"
UUID2 = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def ws(make_host: MakeHost) -> FakeHost:
    return make_host("gpu-workstation")


@pytest.fixture
def virt(make_host: MakeHost) -> FakeHost:
    return make_host("virt-2s")


@pytest.fixture
def nic(make_host: MakeHost) -> FakeHost:
    return make_host("sriov-nic")


@pytest.fixture
def vgpu(make_host: MakeHost) -> FakeHost:
    return make_host("vgpu")


def probe(host: FakeHost, bdf: str) -> None:
    host.write(host.sys / "bus" / "pci" / "drivers_probe", bdf)


# -- the passthrough sequence --------------------------------------------------


def test_passthrough_binds_the_whole_group_to_vfio_and_restores_it(ws: FakeHost) -> None:
    for bdf in (GPU, AUDIO):
        ws.passthrough(bdf)
    assert ws.driver(GPU) == "vfio-pci"
    assert ws.driver(AUDIO) == "vfio-pci"
    assert ws.driver("0000:00:01.0") == "pcieport"
    assert ws.vfio_nodes() == ["1", "vfio"]
    assert ws.read(ws.dev(GPU) / "driver_override") == "vfio-pci\n"
    assert (
        os.readlink(ws.drv("vfio-pci") / GPU)
        == "../../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    )
    for bdf in (GPU, AUDIO):
        ws.restore(bdf)
    assert ws.driver(GPU) == "nvidia"
    assert ws.driver(AUDIO) == "snd_hda_intel"
    assert ws.read(ws.dev(GPU) / "driver_override") == "(null)\n"
    assert ws.vfio_nodes() == ["vfio"]


def test_the_emulator_is_a_sysfs_writer(ws: FakeHost) -> None:
    sysfs = Sysfs(ws.root, KernelEmulator(ws.root))
    sysfs.write(sysfs.path("bus", "pci", "devices", GPU, "driver", "unbind"), GPU)
    assert sysfs.link_name(sysfs.path("bus", "pci", "devices", GPU, "driver")) is None


def test_the_os_writer_refuses_a_fake_tree(ws: FakeHost) -> None:
    with pytest.raises(OSError) as info:
        OsSysfsWriter(ws.root).write(ws.dev(GPU) / "driver_override", "vfio-pci")
    assert info.value.errno == errno.EROFS


def test_another_process_drives_the_same_tree(ws: FakeHost) -> None:
    code = (
        "import sys; from pathlib import Path;"
        "from tessera.agent.testing.kernel import KernelEmulator;"
        "r = Path(sys.argv[1]); k = KernelEmulator(r);"
        "d = r / 'sys/bus/pci/devices/0000:01:00.0';"
        "k.write(d / 'driver/unbind', '0000:01:00.0');"
        "k.write(d / 'driver_override', 'vfio-pci');"
        "k.write(r / 'sys/bus/pci/drivers_probe', '0000:01:00.0')"
    )
    subprocess.run([sys.executable, "-c", code, str(ws.root)], check=True)
    assert ws.driver(GPU) == "vfio-pci"
    assert ws.vfio_nodes() == ["1", "vfio"]


def test_concurrent_writers_are_serialised(virt: FakeHost) -> None:
    pfs = [CX_PF0, CX_PF1, "0000:cb:00.0", "0000:cb:00.1"]
    threads = [
        threading.Thread(target=virt.write, args=(virt.dev(pf) / "sriov_numvfs", "2")) for pf in pfs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(virt.groups())[-8:] == list(range(12, 20))
    assert len(os.listdir(virt.sys / "bus" / "pci" / "devices")) == 14 + 8


# -- driver_override -----------------------------------------------------------


def test_driver_override_is_cut_at_the_first_newline_and_does_not_rebind(ws: FakeHost) -> None:
    ws.write(ws.dev(GPU) / "driver_override", "vfio-pci\nignored")
    assert ws.read(ws.dev(GPU) / "driver_override") == "vfio-pci\n"
    assert ws.driver(GPU) == "nvidia"


@pytest.mark.parametrize("clear", ["", "\n"])
def test_an_empty_driver_override_clears_it(ws: FakeHost, clear: str) -> None:
    ws.write(ws.dev(GPU) / "driver_override", "vfio-pci")
    ws.write(ws.dev(GPU) / "driver_override", clear)
    assert ws.read(ws.dev(GPU) / "driver_override") == "(null)\n"


def test_a_driver_override_of_a_page_is_einval(ws: FakeHost) -> None:
    assert ws.errno_of(ws.dev(GPU) / "driver_override", "x" * 4095) == errno.EINVAL
    ws.write(ws.dev(GPU) / "driver_override", "x" * 4094)


# -- unbind --------------------------------------------------------------------


def test_unbind_removes_both_links_and_disables(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU + "\n")
    assert not os.path.lexists(ws.dev(GPU) / "driver")
    assert not os.path.lexists(ws.drv("nvidia") / GPU)
    assert ws.read(ws.dev(GPU) / "enable") == "0\n"


def test_unbind_from_another_driver_is_enodev(ws: FakeHost) -> None:
    assert ws.errno_of(ws.drv("snd_hda_intel") / "unbind", GPU) == errno.ENODEV
    assert ws.errno_of(ws.drv("nvidia") / "unbind", "0000:09:00.0") == errno.ENODEV
    assert ws.driver(GPU) == "nvidia"


def test_dev_vfio_n_goes_with_the_last_vfio_member_of_the_group(ws: FakeHost) -> None:
    ws.passthrough(GPU)
    ws.passthrough(AUDIO)
    ws.write(ws.drv("vfio-pci") / "unbind", GPU)
    assert ws.vfio_nodes() == ["1", "vfio"]
    ws.write(ws.drv("vfio-pci") / "unbind", AUDIO)
    assert ws.vfio_nodes() == ["vfio"]


# -- bind ----------------------------------------------------------------------


def test_bind_creates_the_links_and_the_group_node(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    ws.write(ws.dev(GPU) / "driver_override", "vfio-pci")
    ws.write(ws.drv("vfio-pci") / "bind", GPU)
    assert ws.driver(GPU) == "vfio-pci"
    assert os.readlink(ws.dev(GPU) / "driver") == "../../../../bus/pci/drivers/vfio-pci"
    assert (ws.root / "dev" / "vfio" / "1").is_file()
    assert (ws.root / "dev" / "vfio" / "vfio").is_file()
    assert ws.read(ws.dev(GPU) / "enable") == "1\n"


def test_bind_of_an_unknown_device_is_enodev(ws: FakeHost) -> None:
    assert ws.errno_of(ws.drv("vfio-pci") / "bind", "0000:09:00.0") == errno.ENODEV


def test_bind_when_the_override_names_another_driver_is_enodev(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    ws.write(ws.dev(GPU) / "driver_override", "vfio-pci")
    assert ws.errno_of(ws.drv("nvidia") / "bind", GPU) == errno.ENODEV


def test_bind_of_a_driver_whose_id_table_does_not_match_is_enodev(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    assert ws.errno_of(ws.drv("snd_hda_intel") / "bind", GPU) == errno.ENODEV
    # vfio-pci's table is override-only: no override, no match.
    assert ws.errno_of(ws.drv("vfio-pci") / "bind", GPU) == errno.ENODEV


def test_bind_of_a_bound_device_is_ebusy(ws: FakeHost) -> None:
    assert ws.errno_of(ws.drv("nvidia") / "bind", GPU) == errno.EBUSY


def test_binding_a_bridge_to_vfio_pci_fails_with_einval(ws: FakeHost) -> None:
    port = "0000:00:01.0"
    ws.write(ws.drv("pcieport") / "unbind", port)
    ws.write(ws.dev(port) / "driver_override", "vfio-pci")
    assert ws.errno_of(ws.drv("vfio-pci") / "bind", port) == errno.EINVAL
    assert ws.driver(port) is None


def test_binding_vfio_pci_without_an_iommu_group_fails_with_einval(make_host: MakeHost) -> None:
    host = make_host("no-iommu")
    gpu = "0000:01:00.0"
    host.write(host.drv("nvidia") / "unbind", gpu)
    host.write(host.dev(gpu) / "driver_override", "vfio-pci")
    assert host.errno_of(host.drv("vfio-pci") / "bind", gpu) == errno.EINVAL
    # drivers_probe swallows the probe error: it succeeds, nothing binds.
    probe(host, gpu)
    assert host.driver(gpu) is None
    assert host.vfio_nodes() == []


def test_binding_vfio_pci_to_a_pf_with_vfs_enabled_fails_with_ebusy(tree_dir: Path) -> None:
    host = _unbound_pf_with_vfs(tree_dir)
    assert host.errno_of(host.drv("vfio-pci") / "bind", "0000:01:00.0") == errno.EBUSY
    probe(host, "0000:01:00.0")
    assert host.driver("0000:01:00.0") is None


def _unbound_pf_with_vfs(root: Path) -> FakeHost:
    """An unbound PF that still has VFs, its override set to vfio-pci.

    PF drivers with ``sriov_configure`` disable their VFs when unbound, so the
    marker is edited to say the driver has none before unbinding it: the VFs
    stay, as with a driver that enabled them from a module parameter.
    """
    fs = FakeSysfs(root)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    fs.register_driver("pfdrv", [PciId(0x15B3, 0x101D)], sriov_configure=True)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
        driver="pcieport",
    )
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:01.0",
        vendor=0x15B3,
        device=0x101D,
        class_code=0x020000,
        driver="pfdrv",
    )
    fs.add_sriov(
        "0000:01:00.0", total=4, offset=1, stride=1, vf_device=0x101E, vf_driver=None, numvfs=2
    )
    fs.build()
    host = FakeHost(root)
    # Drop the PF driver link by hand (as if the driver were unloaded
    # without sriov teardown), keeping the VFs, then set the override.
    meta = json.loads((root / FAKE_HOST_MARKER).read_text())
    meta["drivers"]["pfdrv"]["sriov_configure"] = False
    (root / FAKE_HOST_MARKER).write_text(json.dumps(meta))
    host.write(host.drv("pfdrv") / "unbind", "0000:01:00.0")
    host.write(host.dev("0000:01:00.0") / "driver_override", "vfio-pci")
    return host


def test_vfio_pci_refuses_denylisted_devices_with_einval(tree_dir: Path) -> None:
    fs = FakeSysfs(tree_dir)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    # QAT C62x PF: in vfio_pci_dev_in_denylist().
    fs.add_function(
        "0000:00:05.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x37C8,
        class_code=0x0B4000,
        role=Role.RCIEP,
    )
    fs.build()
    host = FakeHost(tree_dir)
    host.write(host.dev("0000:00:05.0") / "driver_override", "vfio-pci")
    assert host.errno_of(host.drv("vfio-pci") / "bind", "0000:00:05.0") == errno.EINVAL


def test_a_variant_driver_binds_only_through_the_override(virt: FakeHost) -> None:
    virt.write(virt.dev(CX_PF0) / "sriov_drivers_autoprobe", "0")
    virt.write(virt.dev(CX_PF0) / "sriov_numvfs", "1")
    vf = "0000:31:00.2"
    assert virt.driver(vf) is None
    assert virt.errno_of(virt.drv("mlx5_vfio_pci") / "bind", vf) == errno.ENODEV
    virt.write(virt.dev(vf) / "driver_override", "mlx5_vfio_pci")
    virt.write(virt.drv("mlx5_vfio_pci") / "bind", vf)
    assert virt.driver(vf) == "mlx5_vfio_pci"
    assert str(virt.group(vf)) in virt.vfio_nodes()


# -- drivers_probe -------------------------------------------------------------


def test_drivers_probe_of_an_unknown_address_is_enodev(ws: FakeHost) -> None:
    assert ws.errno_of(ws.sys / "bus" / "pci" / "drivers_probe", "0000:77:00.0") == errno.ENODEV


def test_drivers_probe_binds_by_id_table_without_an_override(ws: FakeHost) -> None:
    ws.write(ws.drv("snd_hda_intel") / "unbind", AUDIO)
    probe(ws, AUDIO)
    assert ws.driver(AUDIO) == "snd_hda_intel"


def test_drivers_probe_succeeds_when_nothing_binds(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    ws.write(ws.dev(GPU) / "driver_override", "no_such_driver")
    probe(ws, GPU)
    assert ws.driver(GPU) is None


def test_drivers_probe_of_a_bound_device_changes_nothing(ws: FakeHost) -> None:
    ws.write(ws.dev(GPU) / "driver_override", "vfio-pci")
    probe(ws, GPU)
    assert ws.driver(GPU) == "nvidia"


def test_a_vf_is_probed_only_with_autoprobe_or_an_override(virt: FakeHost) -> None:
    virt.write(virt.dev(CX_PF0) / "sriov_drivers_autoprobe", "n")
    assert virt.read(virt.dev(CX_PF0) / "sriov_drivers_autoprobe") == "0\n"
    virt.write(virt.dev(CX_PF0) / "sriov_numvfs", "2")
    vf0, vf1 = "0000:31:00.2", "0000:31:00.3"
    assert virt.driver(vf0) is None
    probe(virt, vf0)
    assert virt.driver(vf0) is None
    assert virt.errno_of(virt.drv("mlx5_core") / "bind", vf0) == errno.ENODEV
    virt.write(virt.dev(vf1) / "driver_override", "vfio-pci")
    probe(virt, vf1)
    assert virt.driver(vf1) == "vfio-pci"


def test_sriov_drivers_autoprobe_takes_a_bool(virt: FakeHost) -> None:
    path = virt.dev(CX_PF0) / "sriov_drivers_autoprobe"
    assert virt.errno_of(path, "maybe") == errno.EINVAL
    virt.write(path, "0\n")
    virt.write(path, "on")
    assert virt.read(path) == "1\n"


# -- sriov_numvfs --------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-1", "", "1.5"])
def test_sriov_numvfs_that_is_not_a_u16_is_einval(nic: FakeHost, value: str) -> None:
    assert nic.errno_of(nic.dev(CX_PF0) / "sriov_numvfs", value) == errno.EINVAL


@pytest.mark.parametrize("value", ["9", "70000"])
def test_sriov_numvfs_above_totalvfs_is_erange(nic: FakeHost, value: str) -> None:
    assert nic.errno_of(nic.dev(CX_PF0) / "sriov_numvfs", value) == errno.ERANGE


def test_sriov_numvfs_without_a_pf_driver_is_enoent(nic: FakeHost) -> None:
    nic.write(nic.drv("mlx5_core") / "unbind", CX_PF0)
    assert nic.errno_of(nic.dev(CX_PF0) / "sriov_numvfs", "2") == errno.ENOENT
    # Writing the current value is a no-op that succeeds before that check.
    nic.write(nic.dev(CX_PF0) / "sriov_numvfs", "0")


def test_sriov_numvfs_with_a_driver_lacking_sriov_configure_is_enoent(nic: FakeHost) -> None:
    nic.passthrough(CX_PF0)
    assert nic.driver(CX_PF0) == "vfio-pci"
    assert nic.errno_of(nic.dev(CX_PF0) / "sriov_numvfs", "2") == errno.ENOENT


def test_changing_numvfs_without_going_through_zero_is_ebusy(nic: FakeHost) -> None:
    path = nic.dev(CX_PF0) / "sriov_numvfs"
    nic.write(path, "2")
    assert nic.errno_of(path, "3") == errno.EBUSY
    nic.write(path, "2\n")  # equal: nothing happens
    nic.write(path, "0")
    nic.write(path, "0x3")  # kstrtou16 base 0
    assert nic.read(path) == "3\n"


def test_vfs_are_siblings_with_their_own_groups_links_and_driver(nic: FakeHost) -> None:
    before = nic.groups()
    nic.write(nic.dev(CX_PF1) / "sriov_numvfs", "8")
    vfs = [f"0000:31:{(10 + i) // 8:02x}.{(10 + i) % 8}" for i in range(8)]
    assert vfs[0] == "0000:31:01.2" and vfs[-1] == "0000:31:02.1"
    assert nic.groups() == before + list(range(6, 14))
    for i, vf in enumerate(vfs):
        assert os.readlink(nic.dev(vf)) == f"../../../devices/pci0000:30/0000:30:02.0/{vf}"
        assert os.readlink(nic.dev(CX_PF1) / f"virtfn{i}") == f"../{vf}"
        assert os.readlink(nic.dev(vf) / "physfn") == f"../{CX_PF1}"
        assert nic.group_members(6 + i) == [vf]
        assert nic.driver(vf) == "mlx5_core"
    vf_dir = nic.dev(vfs[0])
    assert nic.read(vf_dir / "device") == "0x101e\n"
    assert nic.read(vf_dir / "vendor") == "0x15b3\n"
    assert nic.read(vf_dir / "current_link_speed") == "Unknown\n"
    assert nic.read(vf_dir / "current_link_width") == "0\n"
    assert nic.read(vf_dir / "reset_method") == "flr\n"
    assert nic.read(vf_dir / "local_cpulist") == "0-31,64-95\n"
    assert nic.read(nic.dev(CX_PF1) / "sriov_numvfs") == "8\n"


def test_a_vf_rid_past_devfn_255_lands_on_the_next_bus(tree_dir: Path) -> None:
    fs = FakeSysfs(tree_dir)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
        driver="pcieport",
    )
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:01.0",
        vendor=0x8086,
        device=0x159B,
        class_code=0x020000,
        driver="ice",
    )
    fs.add_sriov("0000:01:00.0", total=16, offset=250, stride=2, vf_device=0x1889, vf_driver="iavf")
    fs.build()
    host = FakeHost(tree_dir)
    host.write(host.dev("0000:01:00.0") / "sriov_numvfs", "4")
    # rid 250, 252, 254, 256: the last is bus 02, devfn 0; still a sibling.
    assert os.readlink(host.dev("0000:01:00.0") / "virtfn3") == "../0000:02:00.0"
    assert os.readlink(host.dev("0000:02:00.0")) == (
        "../../../devices/pci0000:00/0000:00:01.0/0000:02:00.0"
    )
    assert host.read(host.dev("0000:01:00.0") / "virtfn2" / "device") == "0x1889\n"
    assert host.driver("0000:01:1f.6") == "iavf"


def test_vfs_below_a_port_without_acs_join_the_ports_group(tree_dir: Path) -> None:
    fs = FakeSysfs(tree_dir)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        driver="pcieport",
    )
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:01.0",
        vendor=0x15B3,
        device=0x101D,
        class_code=0x020000,
        driver="mlx5_core",
    )
    fs.add_sriov(
        "0000:01:00.0", total=4, offset=2, stride=1, vf_device=0x101E, vf_driver="mlx5_core"
    )
    fs.build()
    host = FakeHost(tree_dir)
    host.write(host.dev("0000:01:00.0") / "sriov_numvfs", "2")
    assert host.groups() == [0]
    assert host.group_members(0) == ["0000:00:01.0", "0000:01:00.0", "0000:01:00.2", "0000:01:00.3"]
    host.write(host.dev("0000:01:00.0") / "sriov_numvfs", "0")
    assert host.group_members(0) == ["0000:00:01.0", "0000:01:00.0"]


def test_numvfs_zero_removes_every_vf_with_its_group_and_links(virt: FakeHost) -> None:
    start = virt.snapshot()
    pf = virt.dev(CX_PF0)
    virt.write(pf / "sriov_numvfs", "4")
    virt.passthrough("0000:31:00.3")
    assert "12" not in virt.vfio_nodes() and "13" in virt.vfio_nodes()
    virt.write(pf / "sriov_numvfs", "0")
    end = virt.snapshot()
    end.pop("dev/vfio", None)
    end.pop("dev/vfio/vfio", None)
    assert end == start
    # Freed group numbers are reused, lowest first (ida).
    virt.write(pf / "sriov_numvfs", "1")
    assert virt.group("0000:31:00.2") == 12


def test_unbinding_the_pf_driver_disables_its_vfs(nic: FakeHost) -> None:
    nic.write(nic.dev(CX_PF0) / "sriov_numvfs", "2")
    nic.write(nic.drv("mlx5_core") / "unbind", CX_PF0)
    assert not os.path.lexists(nic.dev("0000:31:00.2"))
    assert nic.read(nic.dev(CX_PF0) / "sriov_numvfs") == "0\n"


def test_a_failed_write_leaves_the_tree_untouched(tree_dir: Path) -> None:
    fs = FakeSysfs(tree_dir)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
        driver="pcieport",
    )
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:01.0",
        vendor=0x15B3,
        device=0x101D,
        class_code=0x020000,
        driver="mlx5_core",
        multifunction=True,
        acs=True,
    )
    # A second function sits where the third VF would go.
    fs.add_function(
        "0000:01:00.4",
        parent="0000:00:01.0",
        vendor=0x15B3,
        device=0x101D,
        class_code=0x020000,
        driver="mlx5_core",
        multifunction=True,
        acs=True,
    )
    fs.add_sriov(
        "0000:01:00.0", total=8, offset=2, stride=1, vf_device=0x101E, vf_driver="mlx5_core"
    )
    fs.build()
    host = FakeHost(tree_dir)
    before = host.snapshot()
    assert host.errno_of(host.dev("0000:01:00.0") / "sriov_numvfs", "4") == errno.EEXIST
    assert host.snapshot() == before


# -- mdev ----------------------------------------------------------------------


P4 = "0000:3b:00.0"


def types_dir(host: FakeHost, parent: str = P4) -> Path:
    return host.dev(parent) / "mdev_supported_types"


def available(host: FakeHost, type_id: str, parent: str = P4) -> int:
    return int(host.read(types_dir(host, parent) / type_id / "available_instances"))


def test_creating_an_mdev_builds_its_device_group_and_links(vgpu: FakeHost) -> None:
    vgpu.write(types_dir(vgpu) / "nvidia-63" / "create", UUID.upper() + "\n")
    mdev = vgpu.dev(P4) / UUID
    assert os.readlink(mdev / "mdev_type") == "../mdev_supported_types/nvidia-63"
    assert os.readlink(mdev / "iommu_group") == "../../../../../kernel/iommu_groups/4"
    assert vgpu.group_members(4) == [UUID]
    assert vgpu.read(vgpu.sys / "kernel" / "iommu_groups" / "4" / "reserved_regions") == ""
    assert os.readlink(vgpu.sys / "bus" / "mdev" / "devices" / UUID) == (
        f"../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/{UUID}"
    )
    assert os.readlink(types_dir(vgpu) / "nvidia-63" / "devices" / UUID) == f"../../../{UUID}"
    assert os.readlink(vgpu.sys / "class" / "mdev_bus" / P4) == (
        "../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0"
    )
    assert available(vgpu, "nvidia-63") == 7


@pytest.mark.parametrize(
    "data", ["not-a-uuid", UUID[:-1], UUID + "\n\n", "6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9fzz"]
)
def test_mdev_create_with_a_bad_uuid_is_einval(vgpu: FakeHost, data: str) -> None:
    assert vgpu.errno_of(types_dir(vgpu) / "nvidia-63" / "create", data) == errno.EINVAL


def test_mdev_create_with_an_existing_uuid_is_eexist(vgpu: FakeHost) -> None:
    vgpu.write(types_dir(vgpu) / "nvidia-63" / "create", UUID)
    assert vgpu.errno_of(types_dir(vgpu) / "nvidia-63" / "create", UUID) == errno.EEXIST
    rtx = types_dir(vgpu, "0000:d8:00.0") / "nvidia-256" / "create"
    assert vgpu.errno_of(rtx, UUID) == errno.EEXIST  # UUIDs are global


def test_mdev_create_with_no_instance_left_is_eusers(vgpu: FakeHost) -> None:
    create = types_dir(vgpu) / "nvidia-289" / "create"  # P4-8C: one per GPU
    vgpu.write(create, UUID)
    assert available(vgpu, "nvidia-289") == 0
    assert vgpu.errno_of(create, UUID2) == errno.EUSERS


def test_a_single_type_parent_allows_one_type_until_the_last_mdev_goes(vgpu: FakeHost) -> None:
    vgpu.write(types_dir(vgpu) / "nvidia-63" / "create", UUID)
    assert available(vgpu, "nvidia-64") == 0
    assert available(vgpu, "nvidia-63") == 7
    assert vgpu.errno_of(types_dir(vgpu) / "nvidia-64" / "create", UUID2) == errno.EUSERS
    vgpu.write(vgpu.dev(P4) / UUID / "remove", "1")
    assert available(vgpu, "nvidia-64") == 4
    assert available(vgpu, "nvidia-63") == 8
    assert not os.path.lexists(vgpu.dev(P4) / UUID)
    assert not os.path.lexists(vgpu.sys / "bus" / "mdev" / "devices" / UUID)
    assert vgpu.groups() == [0, 1, 2, 3]


def test_mdev_remove_parses_its_value(vgpu: FakeHost) -> None:
    vgpu.write(types_dir(vgpu) / "nvidia-63" / "create", UUID)
    remove = vgpu.dev(P4) / UUID / "remove"
    assert vgpu.errno_of(remove, "yes") == errno.EINVAL
    vgpu.write(remove, "0")
    assert (vgpu.dev(P4) / UUID).is_dir()
    vgpu.write(vgpu.sys / "bus" / "mdev" / "devices" / UUID / "remove", "1\n")
    assert not (vgpu.dev(P4) / UUID).exists()


def test_unbinding_the_parent_driver_takes_its_mdevs_and_types_away(vgpu: FakeHost) -> None:
    vgpu.write(types_dir(vgpu) / "nvidia-63" / "create", UUID)
    vgpu.write(vgpu.drv("nvidia") / "unbind", P4)
    assert not types_dir(vgpu).exists()
    assert not os.path.lexists(vgpu.sys / "class" / "mdev_bus" / P4)
    assert os.listdir(vgpu.sys / "bus" / "mdev" / "devices") == []
    probe(vgpu, P4)
    assert vgpu.driver(P4) == "nvidia"
    assert available(vgpu, "nvidia-64") == 4


# -- other attributes ----------------------------------------------------------


def test_writing_a_read_only_attribute_is_eacces(ws: FakeHost) -> None:
    assert ws.errno_of(ws.dev(GPU) / "vendor", "0x10de") == errno.EACCES
    assert ws.errno_of(ws.sys / "kernel" / "iommu_groups" / "1" / "reserved_regions", "") == (
        errno.EACCES
    )


def test_writing_a_missing_path_is_enoent_and_a_directory_eisdir(ws: FakeHost) -> None:
    assert ws.errno_of(ws.dev(GPU) / "no_such_attr", "1") == errno.ENOENT
    assert ws.errno_of(ws.dev("0000:09:00.0") / "driver_override", "x") == errno.ENOENT
    assert ws.errno_of(ws.dev(GPU), "1") == errno.EISDIR


def test_the_real_device_path_works_like_the_bus_link(ws: FakeHost) -> None:
    real = ws.sys / "devices" / "pci0000:00" / "0000:00:01.0" / GPU
    ws.write(real / "driver_override", "vfio-pci")
    assert ws.read(ws.dev(GPU) / "driver_override") == "vfio-pci\n"


def test_enable_is_ebusy_while_bound_and_eio_when_disabling_twice(ws: FakeHost) -> None:
    assert ws.errno_of(ws.dev(GPU) / "enable", "0") == errno.EBUSY
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    assert ws.errno_of(ws.dev(GPU) / "enable", "0") == errno.EIO
    ws.write(ws.dev(GPU) / "enable", "1")
    assert ws.read(ws.dev(GPU) / "enable") == "1\n"


def test_numa_node_accepts_only_online_nodes(virt: FakeHost) -> None:
    path = virt.dev("0000:4b:00.0") / "numa_node"
    assert virt.errno_of(path, "2") == errno.EINVAL
    assert virt.errno_of(path, "-2") == errno.EINVAL
    virt.write(path, "1")
    assert virt.read(virt.dev("0000:4b:00.0") / "local_cpulist") == "32-63,96-127\n"
    virt.write(path, "-1")
    assert virt.read(virt.dev("0000:4b:00.0") / "local_cpulist") == "0-127\n"


def test_reset_method_restricts_restores_and_rejects(virt: FakeHost) -> None:
    path = virt.dev(CX_PF0) / "reset_method"
    assert virt.errno_of(path, "acpi") == errno.EINVAL
    virt.write(path, "bus")
    assert virt.read(path) == "bus\n"
    virt.write(path, "default")
    assert virt.read(path) == "flr bus\n"
    assert virt.errno_of(virt.dev(CX_PF0) / "reset", "2") == errno.EINVAL
    virt.write(virt.dev(CX_PF0) / "reset", "1")
    assert virt.errno_of(virt.dev("0000:30:02.0") / "reset", "1") == errno.ENOTTY


def test_group_type_changes_only_with_no_driver_bound(ws: FakeHost) -> None:
    path = ws.sys / "kernel" / "iommu_groups" / "0" / "type"
    assert ws.errno_of(path, "bogus") == errno.EINVAL
    ws.write(path, "identity")
    assert ws.read(path) == "identity\n"
    ws.write(path, "auto")
    assert ws.read(path) == "DMA\n"
    assert ws.errno_of(ws.sys / "kernel" / "iommu_groups" / "1" / "type", "DMA-FQ") == errno.EBUSY


def test_new_id_binds_matching_unbound_devices_and_remove_id_forgets(ws: FakeHost) -> None:
    ws.write(ws.drv("nvidia") / "unbind", GPU)
    ws.write(ws.drv("vfio-pci") / "new_id", "10de 2230")
    assert ws.driver(GPU) == "vfio-pci"
    assert ws.driver("0000:02:00.0") == "nvidia"  # bound ones are left alone
    assert ws.errno_of(ws.drv("vfio-pci") / "new_id", "10de 2230") == errno.EEXIST
    assert ws.errno_of(ws.drv("vfio-pci") / "new_id", "10de") == errno.EINVAL
    ws.write(ws.drv("vfio-pci") / "remove_id", "10de 2230")
    assert ws.errno_of(ws.drv("vfio-pci") / "remove_id", "10de 2230") == errno.ENODEV


def test_attributes_the_emulator_does_not_model_fail_loudly(ws: FakeHost) -> None:
    assert ws.errno_of(ws.dev(GPU) / "remove", "1") == errno.EOPNOTSUPP


def test_the_emulator_needs_a_fake_tree(tree_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KernelEmulator(tree_dir)
