"""A handle on a built fake host, with shorthands for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.kernel import KernelEmulator


class FakeHost:
    """A built fake host with shorthands for tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.kernel = KernelEmulator(root)
        self.sysfs = Sysfs(root, self.kernel)

    def dev(self, bdf: str) -> Path:
        """``sys/bus/pci/devices/<bdf>`` (through the bus link)."""
        return self.sys / "bus" / "pci" / "devices" / bdf

    def drv(self, name: str) -> Path:
        return self.sys / "bus" / "pci" / "drivers" / name

    def write(self, path: Path, data: str) -> None:
        self.kernel.write(path, data)

    def errno_of(self, path: Path, data: str) -> int:
        """The errno a write fails with (the test fails if it succeeds)."""
        with pytest.raises(OSError) as info:
            self.kernel.write(path, data)
        assert info.value.errno is not None
        return info.value.errno

    def read(self, path: Path) -> str:
        return path.read_text()

    def driver(self, bdf: str) -> str | None:
        return self.sysfs.link_name(self.dev(bdf) / "driver")

    def group(self, bdf: str) -> int | None:
        name = self.sysfs.link_name(self.dev(bdf) / "iommu_group")
        return int(name) if name is not None else None

    def group_members(self, number: int) -> list[str]:
        return sorted(os.listdir(self.sys / "kernel" / "iommu_groups" / str(number) / "devices"))

    def groups(self) -> list[int]:
        base = self.sys / "kernel" / "iommu_groups"
        return sorted(int(n) for n in os.listdir(base)) if base.is_dir() else []

    def vfio_nodes(self) -> list[str]:
        base = self.root / "dev" / "vfio"
        return sorted(os.listdir(base)) if base.is_dir() else []

    def snapshot(self) -> dict[str, str]:
        """Every file's content and every link's target: to prove nothing changed."""
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root)
                if os.path.islink(path):
                    out[rel] = "-> " + os.readlink(path)
                elif os.path.isfile(path) and not name.startswith(".tessera-fake-host.lock"):
                    try:
                        out[rel] = Path(path).read_text()
                    except PermissionError:
                        out[rel] = "<write-only>"
                elif os.path.isdir(path):
                    out[rel] = "<dir>"
        return out

    def passthrough(self, bdf: str) -> None:
        """driverctl's set-override sequence (HW_FACTS §2) to vfio-pci."""
        current = self.driver(bdf)
        if current is not None:
            self.write(self.drv(current) / "unbind", bdf)
        self.write(self.dev(bdf) / "driver_override", "vfio-pci")
        self.write(self.sys / "bus" / "pci" / "drivers_probe", bdf)

    def restore(self, bdf: str) -> None:
        """driverctl's unset-override: unbind, clear the override, reprobe."""
        current = self.driver(bdf)
        if current is not None:
            self.write(self.drv(current) / "unbind", bdf)
        self.write(self.dev(bdf) / "driver_override", "\n")
        self.write(self.sys / "bus" / "pci" / "drivers_probe", bdf)
