"""Host operations on different devices run side by side; on one PF's VFs, safely.

The agent locks what each operation touches (agent.locks) instead of the
whole host. A kernel write is held open here (a gate) to show what runs
meanwhile and what waits: an mdev and a MIG partition go ahead while a VF is
being bound; a second VF of the same PF too; the PF's VF count is changed
only once no VF operation on it is in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import NullNvmlClient, PynvmlClient
from tessera.agent.reporter import HostReporter
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import Sysfs, SysfsWriter
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.agent.testing.nvml import FakeNvml
from tessera.v1 import placement_pb2

from .test_service_slots import PF, VF1, VF2, attr, driver, mdev, mig, placement, vf

UUID = "3f1d7f58-0c55-4c4e-9b0e-1d2a3b4c5d11"
ONE_G = 19


class Gate:
    """A kernel whose writes matching a test pause until the test opens the gate."""

    def __init__(self, kernel: SysfsWriter) -> None:
        self._kernel = kernel
        self.match: Callable[[Path, str], bool] = lambda _p, _d: False
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.writes: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def write(self, path: Path, data: str) -> None:
        if self.match(path, data):
            self.entered.set()
            assert self.opened.wait(10), "the gate was never opened"
        self._kernel.write(path, data)
        with self._lock:
            self.writes.append((path.name, data))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "virt"
    build("virt-2s", root)
    return root


@pytest.fixture
def gate(root: Path) -> Gate:
    return Gate(KernelEmulator(root))


@pytest.fixture
def agent(root: Path, gate: Gate, tmp_path: Path) -> AgentServicer:
    nvml = FakeNvml.from_tree(root)
    nvml.nvmlInit()
    nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), nvml.NVML_DEVICE_MIG_ENABLE)
    host = Sysfs(root, gate)
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    return AgentServicer(host, reporter, Checkpoint(tmp_path / "cp.json"), nvml=PynvmlClient(nvml))


@pytest.fixture
def host(root: Path) -> Sysfs:
    return Sysfs(root, KernelEmulator(root))


class Call:
    """An agent call in its own thread, as gRPC's worker threads make it."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                fn()
            except BaseException as err:  # surfaced by join()
                self.error = err
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.done.wait(20), "the call never finished"
        if self.error is not None:
            raise self.error


def prepare(agent: AgentServicer, p: placement_pb2.Placement) -> Call:
    return Call(lambda: agent._prepare(p))


def unprepare(agent: AgentServicer, pid: str) -> Call:
    return Call(lambda: agent._unprepare(pid))


def test_an_mdev_and_a_mig_partition_do_not_wait_for_a_vf_being_bound(
    agent: AgentServicer, gate: Gate, host: Sysfs
) -> None:
    gate.match = lambda path, data: path.name == "drivers_probe" and data == VF1
    binding = prepare(agent, placement("nic", vf(1)))
    assert gate.entered.wait(10)

    # The VF's Prepare is stuck in the kernel; other devices go ahead.
    prepare(agent, placement("vgpu", mdev(UUID))).join()
    prepare(agent, placement("slice", mig(ONE_G, 0, 1))).join()
    assert not binding.done.is_set()

    gate.opened.set()
    binding.join()
    assert driver(host, VF1) == "vfio-pci"
    for pid in ("nic", "vgpu", "slice"):
        agent._unprepare(pid)
    assert attr(host, PF, "sriov_numvfs") == "0"


def test_two_vfs_of_one_pf_are_bound_side_by_side(
    agent: AgentServicer, gate: Gate, host: Sysfs
) -> None:
    agent._prepare(placement("a", vf(0)))  # enables the PF's 4 VFs
    gate.match = lambda path, data: path.name == "drivers_probe" and data == VF1
    stuck = prepare(agent, placement("b", vf(1)))
    assert gate.entered.wait(10)
    # The PF has VFs and b holds it only shared: c's VF goes ahead.
    prepare(agent, placement("c", vf(2))).join()
    assert driver(host, VF2) == "vfio-pci"
    assert not stuck.done.is_set()
    gate.opened.set()
    stuck.join()
    for pid in ("a", "b", "c"):
        agent._unprepare(pid)
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"


def test_the_vfs_are_disabled_only_after_a_vf_operation_in_flight_ends(
    agent: AgentServicer, gate: Gate, host: Sysfs, tmp_path: Path
) -> None:
    agent._prepare(placement("owner", vf(0)))  # enabled the VFs: the SR-IOV record is its
    gate.match = lambda path, data: path.name == "drivers_probe" and data == VF1
    binding = prepare(agent, placement("late", vf(1)))
    assert gate.entered.wait(10)

    # Releasing the owner would disable the VFs if nobody held one; it
    # must wait for the bind in flight, then see that VF held and keep them.
    releasing = unprepare(agent, "owner")
    assert not releasing.done.wait(0.3)
    assert ("sriov_numvfs", "0") not in gate.writes
    gate.opened.set()
    binding.join()
    releasing.join()
    assert attr(host, PF, "sriov_numvfs") == "4"
    assert driver(host, VF1) == "vfio-pci"
    assert set(Checkpoint(tmp_path / "cp.json").entries()) == {"late"}

    agent._unprepare("late")
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert Checkpoint(tmp_path / "cp.json").created() == {}


def test_many_vf_placements_at_once_leave_the_pf_as_it_was(
    agent: AgentServicer, host: Sysfs, tmp_path: Path
) -> None:
    for _ in range(3):
        calls = [prepare(agent, placement(f"p{i}", vf(i))) for i in range(4)]
        for c in calls:
            c.join()
        assert attr(host, PF, "sriov_numvfs") == "4"
        calls = [unprepare(agent, f"p{i}") for i in range(4)]
        for c in calls:
            c.join()
        assert attr(host, PF, "sriov_numvfs") == "0"
        assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
        checkpoint = Checkpoint(tmp_path / "cp.json")
        assert checkpoint.entries() == {} and checkpoint.created() == {}
