"""Whole-group passthrough on fake hosts driven by the kernel emulator."""

from __future__ import annotations

import errno
import shutil
import threading
import time
from pathlib import Path

import pytest

from tessera.agent.actuation.vfio import (
    BindingRecord,
    VfioActuationError,
    VfioBinder,
    VfioRestoreError,
)
from tessera.agent.probes.iommu import IommuGroupNumber, probe_iommu
from tessera.agent.probes.pci import PciAddress, PciFunction, probe_pci
from tessera.agent.sysfs import Sysfs, SysfsWriter
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

LEGACY_BRIDGE = "0000:00:1e.0"
LEGACY_NICS = ["0000:06:0d.0", "0000:06:0d.1"]
CX6_PF0 = "0000:31:00.0"
A100 = "0000:4b:00.0"
ROOT_PORT = "0000:4a:01.0"


def host(name: str, tmp_path: Path, writer: SysfsWriter | None = None) -> Sysfs:
    root = tmp_path / name
    build(name, root)
    return Sysfs(root, writer if writer is not None else KernelEmulator(root))


def driver(sysfs: Sysfs, address: str) -> str | None:
    return sysfs.link_name(sysfs.path("bus", "pci", "devices", address, "driver"))


def override(sysfs: Sysfs, address: str) -> str | None:
    value = sysfs.read(sysfs.path("bus", "pci", "devices", address, "driver_override"))
    return None if value == "(null)" else value


def functions(sysfs: Sysfs) -> dict[PciAddress, PciFunction]:
    return {f.address: f for f in probe_pci(sysfs)}


def workstation_gpu_group(sysfs: Sysfs) -> tuple[IommuGroupNumber, tuple[PciAddress, ...]]:
    found = functions(sysfs)
    iommu = probe_iommu(sysfs, found.values())
    gpu = next(f for f in found.values() if f.vendor_id == 0x10DE and f.class_code >> 16 == 0x03)
    group = iommu.group_of(gpu.address)
    assert group is not None
    return group, iommu.endpoints_of(group)


def ensure_vfs(sysfs: Sysfs, pf: str, count: int) -> list[str]:
    """Enable ``count`` VFs on ``pf`` (going through 0, as the kernel requires)."""
    numvfs = sysfs.path("bus", "pci", "devices", pf, "sriov_numvfs")
    if sysfs.read(numvfs) != str(count):
        if sysfs.read(numvfs) != "0":
            sysfs.write(numvfs, "0")
        sysfs.write(numvfs, str(count))
    device = sysfs.path("bus", "pci", "devices", pf)
    return [
        name for i in range(count) if (name := sysfs.link_name(device / f"virtfn{i}")) is not None
    ]


def test_binding_the_workstation_gpu_binds_its_audio_function_too(tmp_path: Path) -> None:
    sysfs = host("gpu-workstation", tmp_path)
    group, endpoints = workstation_gpu_group(sysfs)
    assert len(endpoints) == 2, "the GPU shares its group with its HDMI audio function"
    before = {a: driver(sysfs, a) for a in endpoints}

    records = VfioBinder(sysfs).bind_group(endpoints)

    assert [r.address for r in records] == list(endpoints)
    assert {r.address: r.original_driver for r in records} == before
    for address in endpoints:
        assert driver(sysfs, address) == "vfio-pci"
        assert override(sysfs, address) == "vfio-pci"
    assert (sysfs.dev / "vfio" / str(group)).exists()
    assert probe_iommu(sysfs, probe_pci(sysfs)).groups[group].viable


def test_restore_puts_every_endpoint_back_on_its_own_driver(tmp_path: Path) -> None:
    sysfs = host("gpu-workstation", tmp_path)
    _, endpoints = workstation_gpu_group(sysfs)
    before = {a: (driver(sysfs, a), override(sysfs, a)) for a in endpoints}
    binder = VfioBinder(sysfs)

    binder.restore(binder.bind_group(endpoints))

    assert {a: (driver(sysfs, a), override(sysfs, a)) for a in endpoints} == before


def test_binding_an_already_bound_group_changes_nothing(tmp_path: Path) -> None:
    sysfs = host("gpu-workstation", tmp_path)
    _, endpoints = workstation_gpu_group(sysfs)
    binder = VfioBinder(sysfs)
    first = binder.bind_group(endpoints)

    again = binder.bind_group(endpoints)

    assert all(r.original_driver == "vfio-pci" for r in again)
    assert all(r.original_override == "vfio-pci" for r in again)
    # Restoring the second call's records keeps the devices where they are;
    # restoring the first call's brings the originals back.
    binder.restore(again)
    assert all(driver(sysfs, a) == "vfio-pci" for a in endpoints)
    binder.restore(first)
    assert {driver(sysfs, r.address) for r in first} == {r.original_driver for r in first}


def test_restore_twice_is_harmless(tmp_path: Path) -> None:
    sysfs = host("gpu-workstation", tmp_path)
    _, endpoints = workstation_gpu_group(sysfs)
    binder = VfioBinder(sysfs)
    records = binder.bind_group(endpoints)
    binder.restore(records)

    binder.restore(records)

    assert [driver(sysfs, r.address) for r in records] == [r.original_driver for r in records]


def test_the_legacy_bridge_group_binds_its_two_nics_and_leaves_the_bridge(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    group = iommu.group_of(PciAddress(LEGACY_NICS[0]))
    assert group is not None
    assert list(iommu.endpoints_of(group)) == LEGACY_NICS
    bridge_driver = driver(sysfs, LEGACY_BRIDGE)

    VfioBinder(sysfs).bind_group(iommu.endpoints_of(group))

    assert [driver(sysfs, a) for a in LEGACY_NICS] == ["vfio-pci", "vfio-pci"]
    assert driver(sysfs, LEGACY_BRIDGE) == bridge_driver
    assert probe_iommu(sysfs, probe_pci(sysfs)).groups[group].viable


def leave_out_of_every_group(sysfs: Sysfs, address: str) -> None:
    """Make ``address`` a device the IOMMU did not group (vfio-pci then refuses it)."""
    link = sysfs.path("bus", "pci", "devices", address, "iommu_group")
    group = sysfs.resolve(link)
    (group / "devices" / address).unlink()
    link.unlink()


def test_a_failed_bind_rolls_back_every_endpoint_already_moved(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    leave_out_of_every_group(sysfs, A100)
    nic_group = probe_iommu(sysfs, probe_pci(sysfs)).group_of(PciAddress(LEGACY_NICS[0]))
    endpoints = [*LEGACY_NICS, A100]
    before = {a: (driver(sysfs, a), override(sysfs, a)) for a in endpoints}

    # The two NICs move; vfio-pci's probe of the A100 then fails (EINVAL: no
    # IOMMU group), drivers_probe swallows that, and the check of the driver
    # link catches it.
    with pytest.raises(VfioActuationError) as failure:
        VfioBinder(sysfs).bind_group(endpoints)

    assert (failure.value.address, failure.value.step) == (A100, "verify")
    assert failure.value.rollback_failures == ()
    assert {a: (driver(sysfs, a), override(sysfs, a)) for a in endpoints} == before
    assert not (sysfs.dev / "vfio" / str(nic_group)).exists()


def test_binding_a_pf_disables_its_vfs_and_restore_brings_the_pf_back(tmp_path: Path) -> None:
    # A PF driver's remove() disables SR-IOV, so the VFs go with the unbind;
    # they do not come back on restore (nobody rewrote sriov_numvfs).
    sysfs = host("virt-2s", tmp_path)
    vfs = ensure_vfs(sysfs, CX6_PF0, 2)
    assert vfs
    binder = VfioBinder(sysfs)

    records = binder.bind_group([CX6_PF0])

    assert driver(sysfs, CX6_PF0) == "vfio-pci"
    assert not any(sysfs.exists(sysfs.path("bus", "pci", "devices", vf)) for vf in vfs)
    binder.restore(records)
    assert driver(sysfs, CX6_PF0) == "mlx5_core"


def test_a_bridge_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    before = {a: driver(sysfs, a) for a in [A100, ROOT_PORT]}

    with pytest.raises(VfioActuationError) as failure:
        VfioBinder(sysfs).bind_group([A100, ROOT_PORT])

    assert (failure.value.address, failure.value.step) == (ROOT_PORT, "check")
    assert failure.value.errno == errno.EINVAL
    assert {a: driver(sysfs, a) for a in [A100, ROOT_PORT]} == before
    assert override(sysfs, A100) is None


def test_an_unknown_device_is_refused(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    with pytest.raises(VfioActuationError) as failure:
        VfioBinder(sysfs).bind_group(["0000:ee:00.0"])
    assert (failure.value.step, failure.value.errno) == ("check", errno.ENODEV)


def test_nothing_is_unbound_while_vfio_pci_is_not_loaded(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    shutil.rmtree(sysfs.path("bus", "pci", "drivers", "vfio-pci"), ignore_errors=True)

    with pytest.raises(VfioActuationError) as failure:
        VfioBinder(sysfs).bind_group([A100])

    assert (failure.value.step, failure.value.errno) == ("check", errno.ENOENT)
    assert driver(sysfs, A100) == "nvidia"


def test_restore_goes_on_past_one_device_and_reports_every_failure(tmp_path: Path) -> None:
    sysfs = host("virt-2s", tmp_path)
    binder = VfioBinder(sysfs)
    binder.bind_group([*LEGACY_NICS, A100])
    # A record naming a driver that cannot take the device (e1000 does not
    # list the A100's id) makes that one restore fail.
    records = [
        BindingRecord(A100, "e1000", None),
        BindingRecord(LEGACY_NICS[0], "e1000", None),
        BindingRecord(LEGACY_NICS[1], "e1000", None),
    ]

    with pytest.raises(VfioRestoreError) as failure:
        binder.restore(records)

    assert [f.address for f in failure.value.failures] == [A100]
    assert [driver(sysfs, a) for a in LEGACY_NICS] == ["e1000", "e1000"]


class UnbindBlocksWhileHeld:
    """The kernel's behaviour for a VFIO device a VM holds open: unbind blocks.

    Wraps the emulator; an unbind of ``held`` from vfio-pci waits until
    ``release`` is set.
    """

    def __init__(self, kernel: SysfsWriter, held: str) -> None:
        self._kernel = kernel
        self._held = held
        self.release = threading.Event()

    def write(self, path: Path, data: str) -> None:
        if path.parent.name == "vfio-pci" and path.name == "unbind" and data == self._held:
            self.release.wait()
        self._kernel.write(path, data)


def test_an_unbind_blocked_by_a_vm_times_out_instead_of_hanging(tmp_path: Path) -> None:
    root = tmp_path / "virt-2s"
    build("virt-2s", root)
    writer = UnbindBlocksWhileHeld(KernelEmulator(root), held=A100)
    sysfs = Sysfs(root, writer)
    binder = VfioBinder(sysfs, write_timeout_s=0.2)
    records = binder.bind_group([A100])

    started = time.monotonic()
    with pytest.raises(VfioRestoreError) as failure:
        binder.restore(records)
    writer.release.set()

    assert time.monotonic() - started < 5
    assert (failure.value.step, failure.value.errno) == ("unbind", errno.ETIMEDOUT)


def test_binding_records_survive_a_json_round_trip() -> None:
    for record in (
        BindingRecord("0000:4b:00.0", "nvidia", None),
        BindingRecord("0000:06:0d.0", None, None),
        BindingRecord("0000:31:00.2", "mlx5_core", "mlx5_core"),
    ):
        assert BindingRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"address": "4b:00.0", "original_driver": None, "original_override": None},
        {"address": "0000:4b:00.0", "original_driver": 3, "original_override": None},
    ],
)
def test_a_malformed_binding_record_is_rejected(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="binding record"):
        BindingRecord.from_dict(data)


def test_without_an_iommu_vfio_pci_refuses_and_the_gpu_stays_on_nvidia(tmp_path: Path) -> None:
    sysfs = host("no-iommu", tmp_path)
    gpu = "0000:01:00.0"

    with pytest.raises(VfioActuationError) as failure:
        VfioBinder(sysfs).bind_group([gpu])

    assert (failure.value.address, failure.value.step) == (gpu, "verify")
    assert (driver(sysfs, gpu), override(sysfs, gpu)) == ("nvidia", None)


def test_both_gpus_behind_a_non_acs_switch_move_together(tmp_path: Path) -> None:
    sysfs = host("noacs-switch", tmp_path)
    iommu = probe_iommu(sysfs, probe_pci(sysfs))
    group = iommu.group_of(PciAddress("0000:03:00.0"))
    assert group is not None
    bridges = [m for m in iommu.groups[group].members if m not in iommu.endpoints_of(group)]

    VfioBinder(sysfs).bind_group(iommu.endpoints_of(group))

    assert all(driver(sysfs, a) == "vfio-pci" for a in iommu.endpoints_of(group))
    assert all(driver(sysfs, b) == "pcieport" for b in bridges)
    assert probe_iommu(sysfs, probe_pci(sysfs)).groups[group].viable


def test_a_vf_on_its_variant_driver_comes_back_to_it_with_its_override(tmp_path: Path) -> None:
    sysfs = host("sriov-nic", tmp_path)
    (vf,) = ensure_vfs(sysfs, CX6_PF0, 1)
    if (current := driver(sysfs, vf)) is not None:
        sysfs.write(sysfs.path("bus", "pci", "drivers", current, "unbind"), vf)
    sysfs.write(sysfs.path("bus", "pci", "devices", vf, "driver_override"), "mlx5_vfio_pci")
    sysfs.write(sysfs.path("bus", "pci", "drivers_probe"), vf)
    assert driver(sysfs, vf) == "mlx5_vfio_pci"
    binder = VfioBinder(sysfs)

    records = binder.bind_group([vf])
    assert (driver(sysfs, vf), override(sysfs, vf)) == ("vfio-pci", "vfio-pci")
    binder.restore(records)

    assert (driver(sysfs, vf), override(sysfs, vf)) == ("mlx5_vfio_pci", "mlx5_vfio_pci")
