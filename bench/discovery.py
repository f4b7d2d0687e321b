"""Discovery time of large hosts: how long one full ``discover()`` takes.

Builds fixture hosts on tmpfs, enables every VF their PFs allow (through the
kernel emulator, as an operator's ``sriov_numvfs`` writes would) so that the
hosts carry 200 and more PCI functions, then times discovery in process and
``tessera-agent inventory --json`` as a process. Writes bench/out/discovery.json.

    .venv/bin/python bench/discovery.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tessera.agent.discovery import discover
from tessera.agent.nvml import NullNvmlClient, NvmlClient, open_nvml
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.agent.testing.nvml import STATE_FILE, FakeNvml

OUT = Path(__file__).parent / "out"
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def enable_all_vfs(root: Path) -> int:
    """Write sriov_totalvfs into every PF's sriov_numvfs; returns VFs created."""
    sysfs = Sysfs(root, KernelEmulator(root))
    created = 0
    for address in sysfs.listdir(sysfs.path("bus", "pci", "devices")):
        device = sysfs.path("bus", "pci", "devices", address)
        total = sysfs.read(device / "sriov_totalvfs")
        if total and int(total) > 0:
            sysfs.write(device / "sriov_numvfs", total)
            created += int(total)
    return created


def _nvml(root: Path) -> NvmlClient:
    if (root / STATE_FILE).exists():
        return open_nvml(FakeNvml.from_tree(root))
    return NullNvmlClient("no GPUs")


def measure(fixture: str, repeat: int) -> dict[str, object]:
    """Discovery figures for one fixture with every VF enabled."""
    with tempfile.TemporaryDirectory(prefix="tessera-bench-", dir=SCRATCH) as tmp:
        root = Path(tmp) / fixture
        build(fixture, root)
        vfs = enable_all_vfs(root)
        sysfs = Sysfs(root)
        nvml = _nvml(root)
        functions = len(sysfs.listdir(sysfs.path("bus", "pci", "devices")))
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            discover(sysfs, nvml, host_id=fixture, boot_id="bench", labels={})
            samples.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tessera.agent", "inventory", "--json",
             "--sysfs-root", str(root)],
            check=True, capture_output=True,
        )  # fmt: skip
        cli_s = time.perf_counter() - t0
    ms = sorted(s * 1000 for s in samples)
    return {
        "fixture": fixture,
        "pci_functions": functions,
        "vfs_enabled": vfs,
        "discover_p50_ms": round(statistics.median(ms), 1),
        "discover_max_ms": round(ms[-1], 1),
        "inventory_cli_ms": round(cli_s * 1000, 1),
        "repeat": repeat,
    }


def main() -> int:
    """Measure, write JSON, print a short report."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--fixtures", default="sriov-large,virt-2s,hgx-8gpu,dgx-a100")
    opts = p.parse_args()
    rows = [measure(f, opts.repeat) for f in opts.fixtures.split(",")]
    result = {
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "tmpfs": SCRATCH is not None},
        "hosts": rows,
    }  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "discovery.json").write_text(json.dumps(result, indent=2))
    for r in rows:
        print(
            f"{r['fixture']:10} {r['pci_functions']:4} functions ({r['vfs_enabled']} VFs): "
            f"discover() p50 {r['discover_p50_ms']} ms, max {r['discover_max_ms']} ms; "
            f"`tessera-agent inventory --json` {r['inventory_cli_ms']} ms"
        )
    print(f"written {OUT / 'discovery.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
