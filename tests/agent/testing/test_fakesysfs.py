"""FakeSysfs: the tree is where Linux puts things; groups form as the kernel forms them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.agent.sysfs import FAKE_HOST_MARKER
from tessera.agent.testing.fakesysfs import (
    FakeSysfs,
    PciLink,
    Role,
    format_cpulist,
    format_cpumask,
    parse_cpulist,
)

from .fakehost import FakeHost

MakeHost = Callable[[str], FakeHost]
BuiltHosts = dict[str, FakeHost]

#: Every symlink of sample_tree_virt.txt (reference material, HW_FACTS §0): the
#: synthetic 2-socket host after creating 4 VFs on 31:00.0, 2 on 31:00.1, 3 on
#: 6b:00.0 and one nvidia-63 mdev on b1:00.0.
SAMPLE_LINKS = """
sys/bus/mdev/devices/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01 -> ../../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01
sys/bus/pci/devices/0000:00:1e.0 -> ../../../devices/pci0000:00/0000:00:1e.0
sys/bus/pci/devices/0000:06:0d.0 -> ../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.0
sys/bus/pci/devices/0000:06:0d.1 -> ../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.1
sys/bus/pci/devices/0000:30:02.0 -> ../../../devices/pci0000:30/0000:30:02.0
sys/bus/pci/devices/0000:31:00.0 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.0
sys/bus/pci/devices/0000:31:00.1 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.1
sys/bus/pci/devices/0000:31:00.2 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.2
sys/bus/pci/devices/0000:31:00.3 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.3
sys/bus/pci/devices/0000:31:00.4 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.4
sys/bus/pci/devices/0000:31:00.5 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:00.5
sys/bus/pci/devices/0000:31:01.2 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:01.2
sys/bus/pci/devices/0000:31:01.3 -> ../../../devices/pci0000:30/0000:30:02.0/0000:31:01.3
sys/bus/pci/devices/0000:4a:01.0 -> ../../../devices/pci0000:4a/0000:4a:01.0
sys/bus/pci/devices/0000:4b:00.0 -> ../../../devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0
sys/bus/pci/devices/0000:6b:00.0 -> ../../../devices/pci0000:6b/0000:6b:00.0
sys/bus/pci/devices/0000:6b:00.1 -> ../../../devices/pci0000:6b/0000:6b:00.1
sys/bus/pci/devices/0000:6b:00.2 -> ../../../devices/pci0000:6b/0000:6b:00.2
sys/bus/pci/devices/0000:6b:00.3 -> ../../../devices/pci0000:6b/0000:6b:00.3
sys/bus/pci/devices/0000:b0:02.0 -> ../../../devices/pci0000:b0/0000:b0:02.0
sys/bus/pci/devices/0000:b1:00.0 -> ../../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0
sys/bus/pci/devices/0000:ca:02.0 -> ../../../devices/pci0000:ca/0000:ca:02.0
sys/bus/pci/devices/0000:cb:00.0 -> ../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.0
sys/bus/pci/devices/0000:cb:00.1 -> ../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.1
sys/bus/pci/drivers/4xxx/0000:6b:00.0 -> ../../../../devices/pci0000:6b/0000:6b:00.0
sys/bus/pci/drivers/4xxxvf/0000:6b:00.1 -> ../../../../devices/pci0000:6b/0000:6b:00.1
sys/bus/pci/drivers/4xxxvf/0000:6b:00.2 -> ../../../../devices/pci0000:6b/0000:6b:00.2
sys/bus/pci/drivers/4xxxvf/0000:6b:00.3 -> ../../../../devices/pci0000:6b/0000:6b:00.3
sys/bus/pci/drivers/e1000/0000:06:0d.0 -> ../../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.0
sys/bus/pci/drivers/e1000/0000:06:0d.1 -> ../../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.1
sys/bus/pci/drivers/ice/0000:cb:00.0 -> ../../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.0
sys/bus/pci/drivers/ice/0000:cb:00.1 -> ../../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.1
sys/bus/pci/drivers/mlx5_core/0000:31:00.0 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.0
sys/bus/pci/drivers/mlx5_core/0000:31:00.1 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.1
sys/bus/pci/drivers/mlx5_core/0000:31:00.2 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.2
sys/bus/pci/drivers/mlx5_core/0000:31:00.3 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.3
sys/bus/pci/drivers/mlx5_core/0000:31:00.4 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.4
sys/bus/pci/drivers/mlx5_core/0000:31:00.5 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.5
sys/bus/pci/drivers/mlx5_core/0000:31:01.2 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:01.2
sys/bus/pci/drivers/mlx5_core/0000:31:01.3 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:01.3
sys/bus/pci/drivers/nvidia/0000:4b:00.0 -> ../../../../devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0
sys/bus/pci/drivers/nvidia/0000:b1:00.0 -> ../../../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0
sys/bus/pci/drivers/pcieport/0000:30:02.0 -> ../../../../devices/pci0000:30/0000:30:02.0
sys/bus/pci/drivers/pcieport/0000:4a:01.0 -> ../../../../devices/pci0000:4a/0000:4a:01.0
sys/bus/pci/drivers/pcieport/0000:b0:02.0 -> ../../../../devices/pci0000:b0/0000:b0:02.0
sys/bus/pci/drivers/pcieport/0000:ca:02.0 -> ../../../../devices/pci0000:ca/0000:ca:02.0
sys/class/mdev_bus/0000:b1:00.0 -> ../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0
sys/devices/pci0000:00/0000:00:1e.0/0000:06:0d.0/driver -> ../../../../bus/pci/drivers/e1000
sys/devices/pci0000:00/0000:00:1e.0/0000:06:0d.0/iommu_group -> ../../../../kernel/iommu_groups/0
sys/devices/pci0000:00/0000:00:1e.0/0000:06:0d.1/driver -> ../../../../bus/pci/drivers/e1000
sys/devices/pci0000:00/0000:00:1e.0/0000:06:0d.1/iommu_group -> ../../../../kernel/iommu_groups/0
sys/devices/pci0000:00/0000:00:1e.0/iommu_group -> ../../../kernel/iommu_groups/0
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/iommu_group -> ../../../../kernel/iommu_groups/2
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/virtfn0 -> ../0000:31:00.2
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/virtfn1 -> ../0000:31:00.3
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/virtfn2 -> ../0000:31:00.4
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.0/virtfn3 -> ../0000:31:00.5
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.1/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.1/iommu_group -> ../../../../kernel/iommu_groups/3
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.1/virtfn0 -> ../0000:31:01.2
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.1/virtfn1 -> ../0000:31:01.3
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.2/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.2/iommu_group -> ../../../../kernel/iommu_groups/12
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.2/physfn -> ../0000:31:00.0
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.3/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.3/iommu_group -> ../../../../kernel/iommu_groups/13
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.3/physfn -> ../0000:31:00.0
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.4/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.4/iommu_group -> ../../../../kernel/iommu_groups/14
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.4/physfn -> ../0000:31:00.0
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.5/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.5/iommu_group -> ../../../../kernel/iommu_groups/15
sys/devices/pci0000:30/0000:30:02.0/0000:31:00.5/physfn -> ../0000:31:00.0
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.2/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.2/iommu_group -> ../../../../kernel/iommu_groups/16
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.2/physfn -> ../0000:31:00.1
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.3/driver -> ../../../../bus/pci/drivers/mlx5_core
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.3/iommu_group -> ../../../../kernel/iommu_groups/17
sys/devices/pci0000:30/0000:30:02.0/0000:31:01.3/physfn -> ../0000:31:00.1
sys/devices/pci0000:30/0000:30:02.0/driver -> ../../../bus/pci/drivers/pcieport
sys/devices/pci0000:30/0000:30:02.0/iommu_group -> ../../../kernel/iommu_groups/1
sys/devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0/driver -> ../../../../bus/pci/drivers/nvidia
sys/devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0/iommu_group -> ../../../../kernel/iommu_groups/5
sys/devices/pci0000:4a/0000:4a:01.0/driver -> ../../../bus/pci/drivers/pcieport
sys/devices/pci0000:4a/0000:4a:01.0/iommu_group -> ../../../kernel/iommu_groups/4
sys/devices/pci0000:6b/0000:6b:00.0/driver -> ../../../bus/pci/drivers/4xxx
sys/devices/pci0000:6b/0000:6b:00.0/iommu_group -> ../../../kernel/iommu_groups/6
sys/devices/pci0000:6b/0000:6b:00.0/virtfn0 -> ../0000:6b:00.1
sys/devices/pci0000:6b/0000:6b:00.0/virtfn1 -> ../0000:6b:00.2
sys/devices/pci0000:6b/0000:6b:00.0/virtfn2 -> ../0000:6b:00.3
sys/devices/pci0000:6b/0000:6b:00.1/driver -> ../../../bus/pci/drivers/4xxxvf
sys/devices/pci0000:6b/0000:6b:00.1/iommu_group -> ../../../kernel/iommu_groups/18
sys/devices/pci0000:6b/0000:6b:00.1/physfn -> ../0000:6b:00.0
sys/devices/pci0000:6b/0000:6b:00.2/driver -> ../../../bus/pci/drivers/4xxxvf
sys/devices/pci0000:6b/0000:6b:00.2/iommu_group -> ../../../kernel/iommu_groups/19
sys/devices/pci0000:6b/0000:6b:00.2/physfn -> ../0000:6b:00.0
sys/devices/pci0000:6b/0000:6b:00.3/driver -> ../../../bus/pci/drivers/4xxxvf
sys/devices/pci0000:6b/0000:6b:00.3/iommu_group -> ../../../kernel/iommu_groups/20
sys/devices/pci0000:6b/0000:6b:00.3/physfn -> ../0000:6b:00.0
sys/devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01/iommu_group -> ../../../../../kernel/iommu_groups/21
sys/devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01/mdev_type -> ../mdev_supported_types/nvidia-63
sys/devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/driver -> ../../../../bus/pci/drivers/nvidia
sys/devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/iommu_group -> ../../../../kernel/iommu_groups/8
sys/devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/mdev_supported_types/nvidia-63/devices/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01 -> ../../../6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01
sys/devices/pci0000:b0/0000:b0:02.0/driver -> ../../../bus/pci/drivers/pcieport
sys/devices/pci0000:b0/0000:b0:02.0/iommu_group -> ../../../kernel/iommu_groups/7
sys/devices/pci0000:ca/0000:ca:02.0/0000:cb:00.0/driver -> ../../../../bus/pci/drivers/ice
sys/devices/pci0000:ca/0000:ca:02.0/0000:cb:00.0/iommu_group -> ../../../../kernel/iommu_groups/10
sys/devices/pci0000:ca/0000:ca:02.0/0000:cb:00.1/driver -> ../../../../bus/pci/drivers/ice
sys/devices/pci0000:ca/0000:ca:02.0/0000:cb:00.1/iommu_group -> ../../../../kernel/iommu_groups/11
sys/devices/pci0000:ca/0000:ca:02.0/driver -> ../../../bus/pci/drivers/pcieport
sys/devices/pci0000:ca/0000:ca:02.0/iommu_group -> ../../../kernel/iommu_groups/9
sys/kernel/iommu_groups/0/devices/0000:00:1e.0 -> ../../../../devices/pci0000:00/0000:00:1e.0
sys/kernel/iommu_groups/0/devices/0000:06:0d.0 -> ../../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.0
sys/kernel/iommu_groups/0/devices/0000:06:0d.1 -> ../../../../devices/pci0000:00/0000:00:1e.0/0000:06:0d.1
sys/kernel/iommu_groups/1/devices/0000:30:02.0 -> ../../../../devices/pci0000:30/0000:30:02.0
sys/kernel/iommu_groups/10/devices/0000:cb:00.0 -> ../../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.0
sys/kernel/iommu_groups/11/devices/0000:cb:00.1 -> ../../../../devices/pci0000:ca/0000:ca:02.0/0000:cb:00.1
sys/kernel/iommu_groups/12/devices/0000:31:00.2 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.2
sys/kernel/iommu_groups/13/devices/0000:31:00.3 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.3
sys/kernel/iommu_groups/14/devices/0000:31:00.4 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.4
sys/kernel/iommu_groups/15/devices/0000:31:00.5 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.5
sys/kernel/iommu_groups/16/devices/0000:31:01.2 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:01.2
sys/kernel/iommu_groups/17/devices/0000:31:01.3 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:01.3
sys/kernel/iommu_groups/18/devices/0000:6b:00.1 -> ../../../../devices/pci0000:6b/0000:6b:00.1
sys/kernel/iommu_groups/19/devices/0000:6b:00.2 -> ../../../../devices/pci0000:6b/0000:6b:00.2
sys/kernel/iommu_groups/2/devices/0000:31:00.0 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.0
sys/kernel/iommu_groups/20/devices/0000:6b:00.3 -> ../../../../devices/pci0000:6b/0000:6b:00.3
sys/kernel/iommu_groups/21/devices/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01 -> ../../../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0/6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01
sys/kernel/iommu_groups/3/devices/0000:31:00.1 -> ../../../../devices/pci0000:30/0000:30:02.0/0000:31:00.1
sys/kernel/iommu_groups/4/devices/0000:4a:01.0 -> ../../../../devices/pci0000:4a/0000:4a:01.0
sys/kernel/iommu_groups/5/devices/0000:4b:00.0 -> ../../../../devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0
sys/kernel/iommu_groups/6/devices/0000:6b:00.0 -> ../../../../devices/pci0000:6b/0000:6b:00.0
sys/kernel/iommu_groups/7/devices/0000:b0:02.0 -> ../../../../devices/pci0000:b0/0000:b0:02.0
sys/kernel/iommu_groups/8/devices/0000:b1:00.0 -> ../../../../devices/pci0000:b0/0000:b0:02.0/0000:b1:00.0
sys/kernel/iommu_groups/9/devices/0000:ca:02.0 -> ../../../../devices/pci0000:ca/0000:ca:02.0
"""  # noqa: E501

SAMPLE_MDEV = "6a2a5e2c-5f0e-4a0c-9a51-3d1c2b7e9f01"


def links_under(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root / "sys"):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = os.readlink(path)
    return out


def listing(path: Path) -> list[str]:
    """Entries of a directory, without the directories of functions below a bridge."""
    return sorted(
        n
        for n in os.listdir(path)
        if (path / n).is_symlink() or not (path / n / "vendor").is_file()
    )


# -- the virt-2s tree against the reference sample -----------------------------


def test_virt_2s_matches_every_symlink_of_the_reference_sample(make_host: MakeHost) -> None:
    host = make_host("virt-2s")
    for pf, n in (("0000:31:00.0", 4), ("0000:31:00.1", 2), ("0000:6b:00.0", 3)):
        host.write(host.dev(pf) / "sriov_numvfs", str(n))
    create = host.dev("0000:b1:00.0") / "mdev_supported_types" / "nvidia-63" / "create"
    host.write(create, SAMPLE_MDEV)
    expected = dict(line.split(" -> ") for line in SAMPLE_LINKS.strip().splitlines())
    ours = links_under(host.root)
    assert {k: ours.get(k) for k in expected} == expected
    # What we have beyond the sample is only the drivers the sample omits.
    extra = set(ours) - set(expected)
    assert extra == set()


def test_virt_2s_device_directories_hold_the_sample_files(make_host: MakeHost) -> None:
    host = make_host("virt-2s")
    host.write(host.dev("0000:31:00.0") / "sriov_numvfs", "1")
    common = [
        "class", "device", "driver_override", "enable", "iommu_group", "local_cpulist",
        "local_cpus", "modalias", "numa_node", "remove", "rescan", "reset", "revision",
        "subsystem_device", "subsystem_vendor", "vendor",
    ]  # fmt: skip
    link = ["current_link_speed", "current_link_width", "max_link_speed", "max_link_width"]
    sriov = [
        "sriov_drivers_autoprobe", "sriov_numvfs", "sriov_offset", "sriov_stride",
        "sriov_totalvfs", "sriov_vf_device",
    ]  # fmt: skip
    bridge = ["secondary_bus_number", "subordinate_bus_number"]
    assert listing(host.dev("0000:31:00.0")) == sorted(
        [*common, *link, *sriov, "driver", "reset_method", "virtfn0"]
    )
    assert listing(host.dev("0000:31:00.2")) == sorted(
        [*common, *link, "driver", "reset_method", "physfn"]
    )
    assert listing(host.dev("0000:30:02.0")) == sorted([*common, *link, *bridge, "driver"])
    assert listing(host.dev("0000:00:1e.0")) == sorted([*common, *bridge])
    assert listing(host.dev("0000:06:0d.0")) == sorted([*common, "driver", "reset_method"])
    assert listing(host.dev("0000:6b:00.0")) == sorted([*common, *sriov, "driver", "reset_method"])
    types = host.dev("0000:b1:00.0") / "mdev_supported_types"
    assert listing(types) == [
        "nvidia-157", "nvidia-214", "nvidia-243", "nvidia-288", "nvidia-289", "nvidia-63",
        "nvidia-64",
    ]  # fmt: skip
    assert listing(types / "nvidia-63") == [
        "available_instances", "create", "description", "device_api", "devices", "name",
    ]  # fmt: skip
    node = host.sys / "devices" / "system" / "node"
    assert listing(node) == [
        "has_cpu", "has_memory", "has_normal_memory", "node0", "node1", "online", "possible",
    ]  # fmt: skip
    assert listing(node / "node0") == ["cpulist", "cpumap", "distance", "meminfo"]
    assert listing(host.sys / "kernel" / "iommu_groups" / "0") == [
        "devices", "reserved_regions", "type",
    ]  # fmt: skip


def test_attribute_files_use_the_kernel_formats(make_host: MakeHost) -> None:
    host = make_host("virt-2s")
    pf = host.dev("0000:31:00.0")
    assert host.read(pf / "vendor") == "0x15b3\n"
    assert host.read(pf / "device") == "0x101d\n"
    assert host.read(pf / "class") == "0x020000\n"
    assert host.read(pf / "revision") == "0x00\n"
    assert host.read(pf / "modalias") == "pci:v000015B3d0000101Dsv000015B3sd00000016bc02sc00i00\n"
    assert host.read(pf / "driver_override") == "(null)\n"
    assert host.read(pf / "enable") == "1\n"
    assert host.read(pf / "numa_node") == "0\n"
    assert host.read(pf / "local_cpulist") == "0-31,64-95\n"
    assert host.read(pf / "local_cpus") == "00000000,ffffffff,00000000,ffffffff\n"
    assert host.read(pf / "current_link_speed") == "16.0 GT/s PCIe\n"
    assert host.read(pf / "max_link_width") == "16\n"
    assert host.read(pf / "reset_method") == "flr bus\n"
    assert host.read(pf / "sriov_vf_device") == "101e\n"  # no 0x here
    assert host.read(pf / "sriov_totalvfs") == "8\n"
    assert host.read(pf / "sriov_offset") == "2\n"
    assert host.read(pf / "sriov_numvfs") == "0\n"
    assert host.read(pf / "sriov_drivers_autoprobe") == "1\n"
    assert host.read(host.dev("0000:4b:00.0") / "reset_method") == "bus\n"
    assert host.read(host.dev("0000:4b:00.0") / "revision") == "0xa1\n"
    assert host.read(host.dev("0000:4a:01.0") / "max_link_speed") == "32.0 GT/s PCIe\n"
    assert host.read(host.dev("0000:30:02.0") / "secondary_bus_number") == "49\n"
    assert host.read(host.dev("0000:00:1e.0") / "secondary_bus_number") == "6\n"
    t = host.dev("0000:b1:00.0") / "mdev_supported_types" / "nvidia-63"
    assert host.read(t / "name") == "GRID P4-1Q\n"
    assert host.read(t / "device_api") == "vfio-pci\n"
    assert host.read(t / "available_instances") == "8\n"
    assert host.read(t / "description") == (
        "num_heads=4, frl_config=60, framebuffer=1024M, max_resolution=5120x2880, max_instance=8\n"
    )
    group = host.sys / "kernel" / "iommu_groups" / "2"
    assert host.read(group / "type") == "DMA\n"
    assert host.read(group / "reserved_regions") == "0x00000000fee00000 0x00000000feefffff msi\n"
    node = host.sys / "devices" / "system" / "node"
    assert host.read(node / "online") == "0-1\n"
    assert host.read(node / "node1" / "distance") == "21 10\n"
    assert host.read(node / "node1" / "cpulist") == "32-63,96-127\n"
    assert host.read(node / "node1" / "cpumap") == "ffffffff,00000000,ffffffff,00000000\n"
    meminfo = host.read(node / "node0" / "meminfo").splitlines()
    assert meminfo[0] == "Node 0 MemTotal:       263785472 kB"
    assert meminfo[-1] == "Node 0 HugePages_Surp:      0"


def test_sysfs_modes_say_which_attributes_are_writable(make_host: MakeHost) -> None:
    host = make_host("gpu-workstation")
    gpu = host.dev("0000:01:00.0")
    assert (gpu / "vendor").stat().st_mode & 0o777 == 0o444
    assert (gpu / "driver_override").stat().st_mode & 0o777 == 0o644
    assert (host.drv("nvidia") / "bind").stat().st_mode & 0o777 == 0o200


def test_dgx_uses_the_amd_reserved_regions_and_nps4_distances(built: BuiltHosts) -> None:
    host = built["dgx-a100"]
    group = host.sys / "kernel" / "iommu_groups" / str(host.group("0000:07:00.0"))
    assert host.read(group / "reserved_regions").splitlines() == [
        "0x00000000fee00000 0x00000000feefffff msi",
        "0x000000fd00000000 0x000000ffffffffff reserved",
    ]
    node3 = host.sys / "devices" / "system" / "node" / "node3"
    assert host.read(node3 / "distance") == "12 12 12 10 32 32 32 32\n"
    assert host.read(host.dev("0000:07:00.0") / "local_cpulist") == "48-63,176-191\n"


def test_cpumask_follows_bitmap_string() -> None:
    cpus = parse_cpulist("0-55,112-167")
    assert format_cpumask(cpus, 224) == (
        "00000000,000000ff,ffffffff,ffff0000,00000000,00ffffff,ffffffff"
    )
    assert format_cpumask(range(4), 16) == "000f"
    assert format_cpulist({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_the_marker_records_what_the_tree_cannot(make_host: MakeHost) -> None:
    host = make_host("virt-2s")
    meta = json.loads((host.root / FAKE_HOST_MARKER).read_text())
    assert {"vfio-pci", "pcieport", "mlx5_core", "mlx5_vfio_pci"} <= set(meta["drivers"])
    assert meta["drivers"]["vfio-pci"]["driver_managed_dma"] is True
    assert meta["drivers"]["mlx5_core"]["sriov_configure"] is True
    assert meta["sriov"]["0000:31:00.1"]["offset"] == 9
    assert meta["mdev"]["0000:b1:00.0"]["single_type"] is True
    assert meta["functions"]["0000:00:1e.0"]["role"] == "pci_bridge"


def test_a_fixture_builds_the_same_tree_every_time(tree_dir: Path) -> None:
    from tessera.agent.testing import hosts

    # The small ones: building is file creation bound, and the code is shared.
    for name in ("virt-2s", "gpu-workstation", "noacs-switch", "vgpu"):
        hosts.build(name, tree_dir / f"{name}-a")
        hosts.build(name, tree_dir / f"{name}-b")
        a = FakeHost(tree_dir / f"{name}-a").snapshot()
        b = FakeHost(tree_dir / f"{name}-b").snapshot()
        assert a == b, name


def test_building_twice_into_one_root_is_refused(tree_dir: Path) -> None:
    from tessera.agent.testing import hosts

    hosts.build("no-iommu", tree_dir)
    with pytest.raises(FileExistsError):
        hosts.build("no-iommu", tree_dir)


def test_an_unknown_fixture_name_lists_the_known_ones(tree_dir: Path) -> None:
    from tessera.agent.testing import hosts

    with pytest.raises(KeyError, match="gpu-workstation"):
        hosts.build("no-such-host", tree_dir)


# -- IOMMU group formation (HW_FACTS §5) ----------------------------------------


def test_a_conventional_pci_bridge_shares_its_group_with_everything_below(
    make_host: MakeHost,
) -> None:
    host = make_host("virt-2s")
    assert host.group_members(0) == ["0000:00:1e.0", "0000:06:0d.0", "0000:06:0d.1"]


def test_groups_are_numbered_in_registration_order(make_host: MakeHost) -> None:
    host = make_host("virt-2s")
    order = [
        "0000:00:1e.0", "0000:30:02.0", "0000:31:00.0", "0000:31:00.1", "0000:4a:01.0",
        "0000:4b:00.0", "0000:6b:00.0", "0000:b0:02.0", "0000:b1:00.0", "0000:ca:02.0",
        "0000:cb:00.0", "0000:cb:00.1",
    ]  # fmt: skip
    assert [host.group(b) for b in order] == list(range(12))


def test_multifunction_endpoints_without_acs_share_a_group_with_their_port(
    make_host: MakeHost,
) -> None:
    host = make_host("gpu-workstation")
    assert host.group_members(1) == ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]
    assert host.group_members(2) == ["0000:00:02.0", "0000:02:00.0", "0000:02:00.1"]
    assert host.group_members(0) == ["0000:00:00.0"]


def test_a_switch_without_acs_puts_both_gpus_in_one_group(make_host: MakeHost) -> None:
    host = make_host("noacs-switch")
    assert host.group_members(0) == [
        "0000:00:01.0", "0000:01:00.0", "0000:02:08.0", "0000:02:10.0", "0000:03:00.0",
        "0000:04:00.0",
    ]  # fmt: skip
    assert host.group_members(2) == ["0000:05:00.0"]


def test_acs_everywhere_gives_every_dgx_function_its_own_group(built: BuiltHosts) -> None:
    host = built["dgx-a100"]
    groups = host.groups()
    assert len(groups) == 78
    assert all(len(host.group_members(g)) == 1 for g in groups)
    gpus = ["07", "0f", "47", "4e", "87", "90", "b7", "bd"]
    assert [host.group(f"0000:{b}:00.0") for b in gpus] == [5, 13, 23, 31, 44, 52, 62, 70]


def test_without_an_iommu_there_are_no_groups(make_host: MakeHost) -> None:
    host = make_host("no-iommu")
    assert not (host.sys / "kernel" / "iommu_groups").exists()
    assert host.group("0000:01:00.0") is None
    assert not os.path.lexists(host.dev("0000:01:00.0") / "iommu_group")


def small_host(tree_dir: Path) -> FakeSysfs:
    fs = FakeSysfs(tree_dir)
    fs.add_numa_node(0, "0-3", [10])
    fs.add_root_bus("pci0000:00", 0)
    return fs


def test_multifunction_endpoints_with_acs_get_a_group_each(tree_dir: Path) -> None:
    fs = small_host(tree_dir)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
    )
    for fn in (0, 1):
        fs.add_function(
            f"0000:01:00.{fn}",
            parent="0000:00:01.0",
            vendor=0x15B3,
            device=0x101D,
            class_code=0x020000,
            multifunction=True,
            acs=True,
        )
    fs.add_function(
        "0000:00:02.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
    )
    for fn in (0, 1):
        fs.add_function(
            f"0000:02:00.{fn}",
            parent="0000:00:02.0",
            vendor=0x15B3,
            device=0x101D,
            class_code=0x020000,
            multifunction=True,
        )
    assert fs.compute_groups() == {
        "0000:00:01.0": 0, "0000:01:00.0": 1, "0000:01:00.1": 2,
        "0000:00:02.0": 3, "0000:02:00.0": 4, "0000:02:00.1": 4,
    }  # fmt: skip


def test_a_pcie_to_pci_bridge_aliases_everything_below_it(tree_dir: Path) -> None:
    fs = small_host(tree_dir)
    fs.add_function(
        "0000:00:1c.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
    )
    # The ASPEED AST1150 PCIe-to-PCI bridge and the BMC VGA behind it (C2789 map).
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:1c.0",
        vendor=0x1A03,
        device=0x1150,
        class_code=0x060400,
        role=Role.PCI_BRIDGE,
    )
    fs.add_function(
        "0000:02:00.0",
        parent="0000:01:00.0",
        vendor=0x1A03,
        device=0x2000,
        class_code=0x030000,
        pcie=False,
    )
    assert fs.compute_groups() == {"0000:00:1c.0": 0, "0000:01:00.0": 1, "0000:02:00.0": 1}


def test_vf_geometry_reserves_bus_numbers_on_the_bridge(tree_dir: Path) -> None:
    fs = small_host(tree_dir)
    fs.add_function(
        "0000:00:01.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x1,
        class_code=0x060400,
        role=Role.ROOT_PORT,
        acs=True,
    )
    fs.add_function(
        "0000:01:00.0",
        parent="0000:00:01.0",
        vendor=0x8086,
        device=0x159B,
        class_code=0x020000,
        driver="ice",
        link=PciLink(),
    )
    fs.add_sriov("0000:01:00.0", total=300, offset=16, stride=1, vf_device=0x1889, vf_driver="iavf")
    fs.build()
    port = tree_dir / "sys" / "devices" / "pci0000:00" / "0000:00:01.0"
    assert (port / "secondary_bus_number").read_text() == "1\n"
    assert (port / "subordinate_bus_number").read_text() == "2\n"


def test_the_builder_rejects_inconsistent_descriptions(tree_dir: Path) -> None:
    fs = small_host(tree_dir)
    with pytest.raises(ValueError, match="parent"):
        fs.add_function(
            "0000:01:00.0", parent="0000:00:01.0", vendor=1, device=1, class_code=0x020000
        )
    with pytest.raises(ValueError, match="root bus"):
        fs.add_function(
            "0000:01:00.0", root_bus="pci0000:99", vendor=1, device=1, class_code=0x020000
        )
    with pytest.raises(ValueError, match="PCI address"):
        fs.add_function("01:00.0", root_bus="pci0000:00", vendor=1, device=1, class_code=0x020000)
