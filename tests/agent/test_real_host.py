"""Discovery on this machine's own /sys, read-only: what Linux lists, we report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PCI = Path("/sys/bus/pci/devices")


@pytest.mark.skipif(not PCI.is_dir(), reason="no /sys/bus/pci on this machine")
def test_inventory_of_this_machine_matches_sysfs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tessera.agent", "inventory", "--json", "--host-id", "ci"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    reported = {f["address"]: f for f in inventory["pciFunctions"]}
    assert sorted(reported) == sorted(os.listdir(PCI))
    for address, function in reported.items():
        device = PCI / address
        numa = device / "numa_node"
        # Kernels without CONFIG_NUMA have no numa_node file: "unknown", -1.
        expected_numa = int(numa.read_text()) if numa.exists() else -1
        assert function["numaNode"] == expected_numa, address
        driver = device / "driver"
        expected = os.path.basename(os.readlink(driver)) if driver.is_symlink() else ""
        assert function["driver"] == expected, address
