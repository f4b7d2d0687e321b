"""Enabling and disabling VFs on fake hosts driven by the kernel emulator."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tessera.agent.actuation.sriov import SriovActuationError, SriovConfigurator
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

CX6_PF0 = "0000:31:00.0"  # sriov-nic: 8 VFs at offset 2, stride 1
E810_PF0 = "0000:cb:00.0"


@pytest.fixture
def nic(tmp_path: Path) -> Sysfs:
    root = tmp_path / "nic"
    build("sriov-nic", root)
    return Sysfs(root, KernelEmulator(root))


def attr(sysfs: Sysfs, address: str, name: str) -> str | None:
    return sysfs.read(sysfs.path("bus", "pci", "devices", address, name))


def driver(sysfs: Sysfs, address: str) -> str | None:
    return sysfs.link_name(sysfs.path("bus", "pci", "devices", address, "driver"))


def test_vfs_are_enabled_with_autoprobe_off_so_no_host_driver_grabs_them(nic: Sysfs) -> None:
    sriov = SriovConfigurator(nic)

    sriov.enable(CX6_PF0, 4)

    assert attr(nic, CX6_PF0, "sriov_numvfs") == "4"
    assert attr(nic, CX6_PF0, "sriov_drivers_autoprobe") == "0"
    vfs = [sriov.vf_address(CX6_PF0, i) for i in range(4)]
    assert vfs == ["0000:31:00.2", "0000:31:00.3", "0000:31:00.4", "0000:31:00.5"]
    assert [driver(nic, vf) for vf in vfs if vf] == [None] * 4


def test_enabling_the_count_a_pf_already_has_writes_nothing(nic: Sysfs) -> None:
    sriov = SriovConfigurator(nic)
    nic.write(nic.path("bus", "pci", "devices", CX6_PF0, "sriov_numvfs"), "2")

    sriov.enable(CX6_PF0, 2)

    # Autoprobe untouched: the write would only matter for VFs made later.
    assert attr(nic, CX6_PF0, "sriov_drivers_autoprobe") == "1"
    assert driver(nic, "0000:31:00.2") == "mlx5_core"


def test_disabling_removes_the_vfs_and_puts_autoprobe_back(nic: Sysfs) -> None:
    sriov = SriovConfigurator(nic)
    sriov.enable(E810_PF0, 8)

    sriov.disable(E810_PF0, original_autoprobe=True)
    sriov.disable(E810_PF0, original_autoprobe=True)

    state = sriov.state(E810_PF0)
    assert state is not None
    assert (state.num_vfs, state.drivers_autoprobe) == (0, True)
    assert sriov.vf_address(E810_PF0, 0) is None


def test_a_pf_without_a_driver_cannot_enable_vfs_and_says_why(nic: Sysfs) -> None:
    nic.write(nic.path("bus", "pci", "drivers", "mlx5_core", "unbind"), CX6_PF0)

    with pytest.raises(SriovActuationError) as failure:
        SriovConfigurator(nic).enable(CX6_PF0, 2)

    assert failure.value.errno == errno.ENOENT
    assert CX6_PF0 in str(failure.value)


def test_a_function_that_is_not_a_pf_has_no_sriov_state(nic: Sysfs) -> None:
    assert SriovConfigurator(nic).state("0000:30:02.0") is None
