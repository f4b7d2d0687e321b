"""PynvmlClient, the production NVML path, against the fake driver."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pynvml
import pytest

from tessera.agent.discovery import MigCapable, MigUnsupported, discover
from tessera.agent.nvml import (
    MigMode,
    MigPlacement,
    NullNvmlClient,
    NvmlError,
    PynvmlClient,
    open_nvml,
)
from tessera.agent.report import to_inventory
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.nvml import FakeNvml, fake_gpu
from tessera.v1 import inventory_pb2

A100 = "0000:4b:00.0"
TESLA_P4 = "0000:b1:00.0"


def fixture(name: str, tmp_path: Path) -> tuple[Path, PynvmlClient]:
    root = tmp_path / name
    build(name, root)
    client = open_nvml(FakeNvml.from_tree(root))
    assert isinstance(client, PynvmlClient)
    return root, client


def test_open_nvml_without_a_driver_is_null_with_a_reason() -> None:
    class NoLibrary:
        NVMLError = pynvml.NVMLError

        def nvmlInit(self) -> None:  # noqa: N802 (pynvml's name)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    client = open_nvml(NoLibrary())
    assert isinstance(client, NullNvmlClient)
    assert "not found" in client.reason
    assert client.driver_version() is None


def test_models_uuids_and_bus_ids(tmp_path: Path) -> None:
    _, client = fixture("virt-2s", tmp_path)
    gpus = client.gpus()
    assert [(g.name, g.pci_bus_id, g.memory_mib) for g in gpus] == [
        ("NVIDIA A100 80GB PCIe", "00000000:4B:00.0", 81920),
        ("Tesla P4", "00000000:B1:00.0", 7611),
    ]
    assert all(g.uuid.startswith("GPU-") for g in gpus)
    assert len({g.uuid for g in gpus}) == 2
    assert client.driver_version()


def test_mig_mode_and_profiles(tmp_path: Path) -> None:
    _, client = fixture("virt-2s", tmp_path)
    a100, p4 = client.gpus()
    assert client.mig_mode(p4.uuid) is None
    mode = client.mig_mode(a100.uuid)
    assert mode is not None
    assert mode.current is MigMode.DISABLED
    profiles = {p.profile_id: p for p in client.gpu_instance_profiles(a100.uuid)}
    assert sorted(profiles) == [0, 5, 9, 14, 15, 19, 20]
    assert profiles[9].name == "3g.40gb"
    assert profiles[9].placements == (MigPlacement(0, 4), MigPlacement(4, 4))
    assert profiles[19].placements == tuple(MigPlacement(s, 1) for s in range(7))


def test_instances_with_compute_instances_and_mig_uuids() -> None:
    nvml = FakeNvml.in_memory([fake_gpu("H100-80GB-HBM3", A100, seed="t", mig_enabled=True)])
    client = open_nvml(nvml)
    (gpu,) = client.gpus()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(
        handle, 9, ctypes.byref(nvml.c_nvmlGpuInstancePlacement_t(4, 4))
    )
    nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    nvml.nvmlDeviceCreateGpuInstance(handle, 19)
    instances = client.gpu_instances(gpu.uuid)
    by_profile = {i.profile_id: i for i in instances}
    assert by_profile[9].placement == MigPlacement(4, 4)
    (ci,) = by_profile[9].compute_instances
    assert ci.profile_id == 2
    assert ci.uuid.startswith("MIG-")
    assert by_profile[19].compute_instances == ()
    assert len({i.gi_id for i in instances}) == 2


def test_nvml_errors_become_nvml_errors() -> None:
    nvml = FakeNvml.in_memory([fake_gpu("Tesla-P4", TESLA_P4, seed="t")])
    client = PynvmlClient(nvml)  # never initialised
    with pytest.raises(NvmlError, match="NVML_ERROR_UNINITIALIZED"):
        client.gpus()


def test_discovery_of_virt_2s_fills_gpus(tmp_path: Path) -> None:
    root, client = fixture("virt-2s", tmp_path)
    report = discover(Sysfs(root), client, host_id="v", boot_id="b", labels={})
    gpus: dict[str, Any] = {g.address: g for g in report.gpus}
    assert set(gpus) == {A100, TESLA_P4}
    assert isinstance(gpus[TESLA_P4].mig, MigUnsupported)
    mig = gpus[A100].mig
    assert isinstance(mig, MigCapable)
    assert len(mig.profiles) == 7
    assert not any(n.startswith("nvml:") for n in report.notes)

    inv = to_inventory(report, 1)
    wire = {g.address: g for g in inv.gpus}
    a100 = wire[A100]
    assert a100.model == "NVIDIA A100 80GB PCIe"
    assert a100.memory_mib == 81920
    assert a100.mig_mode_current == inventory_pb2.MIG_MODE_DISABLED
    three_g = next(p for p in a100.mig_profiles if p.profile_id == 9)
    assert [(p.start, p.size) for p in three_g.placements] == [(0, 4), (4, 4)]
    assert wire[TESLA_P4].mig_mode_current == inventory_pb2.MIG_MODE_UNSUPPORTED


@pytest.mark.parametrize(
    ("name", "model", "count", "mig"),
    [
        ("dgx-a100", "NVIDIA A100-SXM4-40GB", 8, True),
        ("hgx-8gpu", "NVIDIA H100 80GB HBM3", 8, True),
        ("gpu-workstation", "NVIDIA RTX A6000", 2, False),
    ],
)
def test_fixture_hosts_gpus_sit_on_their_pci_functions(
    tmp_path: Path, name: str, model: str, count: int, mig: bool
) -> None:
    root, client = fixture(name, tmp_path)
    report = discover(Sysfs(root), client, host_id=name, boot_id="b", labels={})
    assert [g.model for g in report.gpus] == [model] * count
    assert all(isinstance(g.mig, MigCapable) == mig for g in report.gpus)
    # Each GPU is a PCI function of the tree (else discovery notes it).
    assert not any(n.startswith("nvml:") for n in report.notes)


def test_inventory_command_reads_the_fake_driver(tmp_path: Path) -> None:
    root = tmp_path / "virt-2s"
    build("virt-2s", root)
    out = subprocess.run(
        [sys.executable, "-m", "tessera.agent", "inventory", "--sysfs-root", str(root), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    gpus = {g["address"]: g for g in json.loads(out)["gpus"]}
    assert gpus[A100]["model"] == "NVIDIA A100 80GB PCIe"
    assert gpus[A100]["migModeCurrent"] == "MIG_MODE_DISABLED"
    assert gpus[TESLA_P4]["migModeCurrent"] == "MIG_MODE_UNSUPPORTED"
