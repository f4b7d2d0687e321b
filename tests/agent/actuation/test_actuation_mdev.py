"""Creating and removing mdevs on the vGPU fixture host driven by the kernel emulator."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tessera.agent.actuation.mdev import MdevActuationError, MdevManager
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

P4 = "0000:3b:00.0"  # vgpu: Tesla P4, one vGPU type at a time
UUID_A = "5b2a6a2e-7a7e-4d0c-9a53-6f7f6c1d2e01"
UUID_B = "5b2a6a2e-7a7e-4d0c-9a53-6f7f6c1d2e02"


@pytest.fixture
def vgpu(tmp_path: Path) -> Sysfs:
    root = tmp_path / "vgpu"
    build("vgpu", root)
    return Sysfs(root, KernelEmulator(root))


def test_an_mdev_is_created_with_its_own_iommu_group(vgpu: Sysfs) -> None:
    mdev = MdevManager(vgpu)
    before = mdev.available(P4, "nvidia-63")

    mdev.create(P4, "nvidia-63", UUID_A)

    assert mdev.type_of(UUID_A) == "nvidia-63"
    assert mdev.parent_of(UUID_A) == P4
    assert mdev.iommu_group(UUID_A) == 4  # the next free group (hosts.vgpu)
    assert mdev.available(P4, "nvidia-63") == before - 1


def test_creating_an_mdev_that_exists_with_its_type_is_idempotent(vgpu: Sysfs) -> None:
    mdev = MdevManager(vgpu)
    mdev.create(P4, "nvidia-63", UUID_A)

    mdev.create(P4, "nvidia-63", UUID_A)

    assert vgpu.listdir(vgpu.path("bus", "mdev", "devices")) == [UUID_A]


def test_the_kernel_refusing_a_second_type_on_a_p4_is_reported(vgpu: Sysfs) -> None:
    mdev = MdevManager(vgpu)
    mdev.create(P4, "nvidia-63", UUID_A)

    with pytest.raises(MdevActuationError) as failure:
        mdev.create(P4, "nvidia-64", UUID_B)

    assert failure.value.errno == errno.EUSERS
    assert mdev.type_of(UUID_B) is None


def test_removing_an_mdev_twice_is_fine(vgpu: Sysfs) -> None:
    mdev = MdevManager(vgpu)
    mdev.create(P4, "nvidia-63", UUID_A)

    mdev.remove(UUID_A)
    mdev.remove(UUID_A)

    assert mdev.type_of(UUID_A) is None
    assert mdev.available(P4, "nvidia-63") == 8
