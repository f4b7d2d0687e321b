"""Crash injection: which calls of the fakes count as host writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.agent.testing.crash import CRASH_ENV, writes_counted
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.agent.testing.nvml import FakeNvml

from .fakehost import FakeHost

PF = "0000:31:00.0"


def test_without_the_variable_nothing_is_counted(tree_dir: Path) -> None:
    build("virt-2s", tree_dir)
    KernelEmulator(tree_dir).write(
        tree_dir / "sys" / "bus" / "pci" / "devices" / PF / "sriov_numvfs", "2"
    )

    assert writes_counted(tree_dir) == 0


def test_applied_sysfs_writes_and_nvml_changes_count_failed_writes_do_not(
    tree_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build("virt-2s", tree_dir)
    monkeypatch.setenv(CRASH_ENV, "1000")
    kernel = KernelEmulator(tree_dir)
    numvfs = tree_dir / "sys" / "bus" / "pci" / "devices" / PF / "sriov_numvfs"

    kernel.write(numvfs, "2")
    with pytest.raises(OSError):
        kernel.write(numvfs, "4")  # EBUSY: VFs exist
    nvml = FakeNvml.from_tree(tree_dir)
    nvml.nvmlInit()
    nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), nvml.NVML_DEVICE_MIG_ENABLE)

    assert writes_counted(tree_dir) == 2


def test_the_process_is_killed_right_after_the_nth_write(tree_dir: Path) -> None:
    build("virt-2s", tree_dir)
    numvfs = tree_dir / "sys" / "bus" / "pci" / "devices" / PF / "sriov_numvfs"
    script = (
        "import sys; from pathlib import Path\n"
        "from tessera.agent.testing.kernel import KernelEmulator\n"
        "k = KernelEmulator(Path(sys.argv[1]))\n"
        "k.write(Path(sys.argv[2]), '2')\n"
        "print('survived')\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script, str(tree_dir), str(numvfs)],
        env={**os.environ, CRASH_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == -signal.SIGKILL
    assert "survived" not in done.stdout
    host = FakeHost(tree_dir)
    assert host.read(host.dev(PF) / "sriov_numvfs").strip() == "2"  # applied before the kill
    assert writes_counted(tree_dir) == 1
